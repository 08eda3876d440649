"""Versioned records of every message streamrec reads or writes, and their validation.

Every record has an explicit namespace ``streamrec.v1.<Name>``; a new version gets a new
namespace and the old one stays decodable.
"""

from schemas.catalog import ItemDelete, ItemUpsert
from schemas.deadletter import DeadLetter
from schemas.events import Click, ForgetUser, Query
from schemas.recommendations import RecommendationRequest, RecommendedItem, Recommendations
from schemas.validate import InvalidMessage, Limits, parse_catalog, parse_event, parse_request

RECORDS = (ItemUpsert, ItemDelete, Click, Query, ForgetUser, RecommendationRequest,
           RecommendedItem, Recommendations, DeadLetter)

__all__ = [
    "RECORDS", "ItemUpsert", "ItemDelete", "Click", "Query", "ForgetUser", "RecommendationRequest",
    "RecommendedItem", "Recommendations", "DeadLetter", "InvalidMessage", "Limits",
    "parse_catalog", "parse_event", "parse_request",
]
