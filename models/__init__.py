"""Pure recommendation code: encoder, profile updates, interest, ranking. No I/O."""
