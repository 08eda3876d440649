"""``streamrec``: one console script, a subcommand per role. Every option can also come from the
environment as ``STREAMREC_<NAME>`` (see ``streamrec worker --help`` and the settings object)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _settings():
    """The settings from the environment; invalid ones exit with each problem on a line (never the
    values, which may be secrets)."""
    from pydantic import ValidationError

    from workers.settings import Settings, unknown_variables

    unknown = unknown_variables(os.environ)
    if unknown:
        print("streamrec: unknown settings in the environment (no such STREAMREC_* variable):\n"
              + "\n".join(f"  {u}" for u in unknown), file=sys.stderr)
        raise SystemExit(2)
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                 for e in exc.errors(include_url=False, include_input=False, include_context=False)]
        print("streamrec: invalid settings (STREAMREC_* environment):\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def cmd_up(args: argparse.Namespace) -> int:
    from workers.kafka_broker import KafkaUnavailable, auto_broker
    from workers.stack import Stack

    settings = _settings()
    broker = args.broker
    if broker == "auto":
        broker, why = auto_broker()
        print(f"streamrec up: broker {broker} ({why})", file=sys.stderr, flush=True)
    stack = Stack(Path(args.data_dir or settings.data_dir), args.kafka_port, args.redis_port, args.milvus_port,
                  broker=broker)
    try:
        stack.start()
    except KafkaUnavailable as exc:
        print(f"streamrec up: Apache Kafka not started: {exc} (`--broker tansu` needs no Java)", file=sys.stderr)
        return 1
    print(json.dumps({"kafka": stack.kafka_bootstrap, "redis": stack.redis_url, "milvus": stack.milvus_uri,
                      "versions": stack.versions}), flush=True)
    for k, v in stack.env().items():
        print(f"export {k}={v}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        if dead:
            print(f"streamrec up: {', '.join(dead)} exited; stopping", file=sys.stderr)
            break
    stack.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging.config

    from streams.logs import logging_config
    from streams.stores.items import EncoderMismatch
    from workers.preflight import ServiceError
    from workers.worker import run_worker

    settings = _settings()
    logging.config.dictConfig(logging_config(args.loglevel, settings.log_format))
    logging.getLogger("streamrec.worker").info("settings: %s", json.dumps(settings.masked()))
    try:
        run_worker(settings, args.loglevel)
    except ServiceError as exc:
        print(f"streamrec worker: {settings.scrub(str(exc))}", file=sys.stderr, flush=True)
        return 1
    except EncoderMismatch as exc:
        print(f"streamrec worker: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_settings().masked(), indent=2))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from schemas import InvalidMessage, Limits
    from schemas.validate import CATALOG_TYPES, EVENT_TYPES, REQUEST_TYPES, _parse
    from streams.stores.eventlog import KafkaEventLog, all_topics
    from workers.runner import encode_line, topic_for

    settings = _settings()
    limits = Limits.from_settings(settings)
    types = {**EVENT_TYPES, **CATALOG_TYPES, **REQUEST_TYPES}
    now = time.time()
    by_topic: dict[str, list] = {}
    errors = 0
    with open(args.file, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if args.stamp_now and isinstance(obj, dict) and "timestamp" not in obj:
                    obj["timestamp"] = now
                key, value = encode_line(obj) if isinstance(obj, dict) else (None, line.strip())
                _parse(value, types, limits, now)
            except (ValueError, InvalidMessage) as exc:
                errors += 1
                reason = exc.reason if isinstance(exc, InvalidMessage) else f"not JSON: {exc}"
                print(f"{args.file}:{lineno}: {reason}", file=sys.stderr)
                continue
            by_topic.setdefault(topic_for(settings, obj), []).append((key, value, None))
    if errors and not args.skip_invalid:
        print(f"streamrec load: {errors} invalid line(s), nothing sent (use --skip-invalid to send the rest)",
              file=sys.stderr)
        return 2
    log = KafkaEventLog.from_settings(settings)
    log.ensure_topics(all_topics(settings), settings.topic_partitions, settings.topic_replication)
    total = sum(log.publish(topic, records) for topic, records in by_topic.items())
    log.close()
    print(json.dumps({"sent": total, "invalid": errors, "topics": {t: len(r) for t, r in by_topic.items()}}))
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from schemas.jsonschema import all_schemas

    schemas = all_schemas()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for ns, schema in schemas.items():
            (out / f"{ns}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {out}")
    else:
        print(json.dumps(schemas, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    summary = run_demo(_settings(), users=args.users, events_per_user=args.events_per_user, items=args.items,
                       rate=args.rate, data_dir=args.data_dir)
    print(json.dumps(summary), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from workers.bench import run_bench

    result = run_bench(_settings(), events=args.events, items=args.items, data_dir=args.data_dir)
    print(json.dumps(result), flush=True)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from streams.security import kafka_client_options
    from workers.replay import record

    settings = _settings()
    n = record(settings.kafka_bootstrap, args.topics, Path(args.out), start=args.start, end=args.end,
               timeout_s=args.timeout, progress=not args.quiet, kafka_options=kafka_client_options(settings))
    print(json.dumps({"recorded": n, "file": args.out}))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from streams.security import kafka_client_options
    from workers.replay import replay

    settings = _settings()
    rename = {}
    for pair in args.rename:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            print(f"streamrec replay: --rename takes OLD=NEW, got {pair!r}", file=sys.stderr)
            return 2
        rename[old] = new
    default_state = args.file + ("." + "+".join(args.topic) if args.topic else "") + ".replay-state"
    state = Path(args.state or default_state)
    n = replay(settings.kafka_bootstrap, Path(args.file), rename=rename, speed=args.speed, state=state,
               progress=not args.quiet, topics=args.topic or None, kafka_options=kafka_client_options(settings))
    print(json.dumps({"sent": n, "state": str(state)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from workers.datasets import load_dataset
    from workers.evaluate import SYSTEMS, EvalOptions, run_eval

    if args.k < 1 or args.in_flight < 1 or (args.limit_events is not None and args.limit_events < 1):
        print("streamrec eval: --k, --in-flight and --limit-events must be positive", file=sys.stderr)
        return 2
    peers = tuple(p for p in (args.peers.split(",") if args.peers else SYSTEMS[1:]) if p)
    unknown = [p for p in peers if p not in SYSTEMS[1:]]
    if unknown:
        print(f"streamrec eval: unknown peer(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS[1:])}",
              file=sys.stderr)
        return 2
    try:
        dataset = load_dataset(args.dataset, args.format, min_rating=args.min_rating, limit_events=args.limit_events)
    except (OSError, ValueError, KeyError) as exc:
        print(f"streamrec eval: cannot load {args.dataset}: {exc}", file=sys.stderr)
        return 2
    settings = _settings()
    if args.k > settings.max_k:
        print(f"streamrec eval: --k {args.k} is over max_k {settings.max_k} (STREAMREC_MAX_K)", file=sys.stderr)
        return 2
    from models.learning import SIGNALS

    ablate = tuple(x.strip() for x in (args.ablate or "").split(",") if x.strip())
    if set(ablate) - set(SIGNALS):
        print(f"streamrec eval: unknown signal(s) in --ablate: {', '.join(sorted(set(ablate) - set(SIGNALS)))}; "
              f"known: {', '.join(SIGNALS)}", file=sys.stderr)
        return 2
    opts = EvalOptions(k=args.k, in_flight=args.in_flight, halflife_s=args.halflife_days * 86_400.0,
                       als_every=args.als_every, seed=args.seed, peers=peers, ablate=ablate)
    out = Path(args.out)
    result = run_eval(settings, dataset, out, opts, data_dir=args.data_dir)
    table = {name: {m: v for m, v in r.items() if m != "segments"} for name, r in result["systems"].items()}
    print(json.dumps({"eval": str(out / "eval.json"), "report": str(out / "report.md"),
                      "plots": [str(out / "hr_over_stream.png"), str(out / "latency_histogram.png")],
                      "latency_ms": result["latency_ms"], "throughput_eps": result["throughput_eps"],
                      "systems": table}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded stack (Kafka broker, redis-server, Milvus Lite) and print its addresses")
    up.add_argument("--data-dir", default=None, help="where the stack keeps its files (STREAMREC_DATA_DIR)")
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--redis-port", type=int, default=6379)
    up.add_argument("--milvus-port", type=int, default=19530)
    up.add_argument("--broker", choices=("auto", "apache-kafka", "tansu"), default="auto",
                    help="apache-kafka (the real Apache Kafka in KRaft mode on Java 17, its jars fetched once from "
                         "Maven Central: every Kafka client works with it), tansu (a single binary, no Java), or auto "
                         "(the default: apache-kafka where Java 17+ runs and its jars are cached or Maven is there, "
                         "else tansu)")
    up.set_defaults(func=cmd_up)

    w = sub.add_parser("worker", help="run the Faust worker against the broker, Redis and Milvus of the settings")
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=cmd_worker)

    cf = sub.add_parser("config", help="print the settings from the environment as JSON, secrets masked")
    cf.set_defaults(func=cmd_config)

    ld = sub.add_parser("load", help="publish a JSONL file of catalog items, events or requests to their topics")
    ld.add_argument("file")
    ld.add_argument("--stamp-now", action="store_true", help="give lines without a timestamp the current time")
    ld.add_argument("--skip-invalid", action="store_true", help="send the valid lines even if some are invalid")
    ld.set_defaults(func=cmd_load)

    rec = sub.add_parser("record", help="copy topics (inputs and/or outputs) to a gzipped JSONL recording")
    rec.add_argument("topics", nargs="+")
    rec.add_argument("--out", required=True, help="the recording to write (.jsonl.gz)")
    rec.add_argument("--from", dest="start", default="earliest",
                     help="earliest, a time (Unix seconds or ISO-8601), or offsets P=OFFSET[,TOPIC/P=OFFSET...]")
    rec.add_argument("--to", dest="end", default="now", help="now, count:N, or a time")
    rec.add_argument("--timeout", type=float, default=600.0, help="seconds to reach the end before failing")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(func=cmd_record)

    rp = sub.add_parser("replay", help="publish a recording back into topics, resumable")
    rp.add_argument("file")
    rp.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="publish OLD's messages to NEW")
    rp.add_argument("--speed", type=float, default=0.0, help="N times the recorded pace (0: as fast as possible)")
    rp.add_argument("--state", default=None, help="resume file (default: FILE.replay-state)")
    rp.add_argument("--topic", action="append", default=[], help="replay only this recorded topic (repeatable)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_replay)

    sc = sub.add_parser("schemas", help="print or export the JSON Schemas of every record")
    sc.add_argument("--out", default=None, help="a folder to write one <namespace>.schema.json per record into")
    sc.set_defaults(func=cmd_schemas)

    d = sub.add_parser("demo", help="start the stack and a worker, stream the demo catalog and users, print a summary")
    d.add_argument("--users", type=int, default=60)
    d.add_argument("--events-per-user", type=int, default=12)
    d.add_argument("--items", type=int, default=400)
    d.add_argument("--rate", type=float, default=100.0, help="events per second offered (0: as fast as possible)")
    d.add_argument("--data-dir", default=None)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="measure throughput and latency through the embedded stack, beside each part's limit")
    b.add_argument("--events", type=int, default=2000)
    b.add_argument("--items", type=int, default=2000)
    b.add_argument("--data-dir", default=None)
    b.set_defaults(func=cmd_bench)
    ev = sub.add_parser("eval", help="score a data set through the real pipeline, test-then-train, beside peers")
    ev.add_argument("--dataset", required=True, help="a MovieLens folder or a folder with catalog.jsonl and events.jsonl")
    ev.add_argument("--format", choices=("movielens", "jsonl"), default=None, help="default: guessed from the files")
    ev.add_argument("--limit-events", type=int, default=None, help="only the first N events (quick runs)")
    ev.add_argument("--k", type=int, default=10, help="list length scored (HR@K, NDCG@K)")
    ev.add_argument("--out", required=True, help="folder for eval.json, report.md and the plots")
    ev.add_argument("--min-rating", type=float, default=0.0, help="MovieLens: ratings at or above this are clicks")
    ev.add_argument("--in-flight", type=int, default=256, help="events sent and not yet answered, at most")
    ev.add_argument("--peers", default=None, help="comma-separated peers to run (default: all)")
    ev.add_argument("--halflife-days", type=float, default=7.0, help="half-life of popularity in event time, for streamrec and recent_popularity")
    ev.add_argument("--als-every", type=int, default=5000, help="implicit_als retrains every N clicks")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--ablate", default=None,
                    help="comma-separated signals to switch off one at a time (text, cooccur, transitions, "
                         "popularity, interest, learning); each run is the worker's pipeline in one process")
    ev.add_argument("--data-dir", default=None, help="where the embedded stack keeps its files (default: a temp dir)")
    ev.set_defaults(func=cmd_eval)
    return p


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the embedded stack's child processes are stopped too."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "bench", "eval"):
        _exit_on_sigterm()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
