"""``streamrec``: one console script, a subcommand per role. Every option can also come from the
environment as ``STREAMREC_<NAME>`` (see ``streamrec worker --help`` and the settings object)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path


def _settings():
    from workers.settings import Settings

    return Settings()


def cmd_up(args: argparse.Namespace) -> int:
    from workers.stack import Stack

    settings = _settings()
    stack = Stack(Path(args.data_dir or settings.data_dir), args.kafka_port, args.redis_port, args.milvus_port)
    stack.start()
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
    from workers.worker import run_worker

    settings = _settings()
    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("streamrec.worker").info("settings: %s", json.dumps(settings.masked()))
    run_worker(settings, args.loglevel)
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
    log = KafkaEventLog(settings.kafka_bootstrap)
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
    from workers.replay import record

    settings = _settings()
    n = record(settings.kafka_bootstrap, args.topics, Path(args.out), start=args.start, end=args.end,
               timeout_s=args.timeout, progress=not args.quiet)
    print(json.dumps({"recorded": n, "file": args.out}))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
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
               progress=not args.quiet, topics=args.topic or None)
    print(json.dumps({"sent": n, "state": str(state)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded stack (Kafka broker, redis-server, Milvus Lite) and print its addresses")
    up.add_argument("--data-dir", default=None, help="where the stack keeps its files (STREAMREC_DATA_DIR)")
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--redis-port", type=int, default=6379)
    up.add_argument("--milvus-port", type=int, default=19530)
    up.set_defaults(func=cmd_up)

    w = sub.add_parser("worker", help="run the Faust worker against the broker, Redis and Milvus of the settings")
    w.add_argument("--loglevel", default="info")
    w.set_defaults(func=cmd_worker)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
