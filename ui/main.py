"""`foundry-ui`: the local web app. Binds 127.0.0.1 by default; any other address needs a token.

    foundry-ui                                   # http://127.0.0.1:7860, runs under ./outputs
    foundry-ui --outputs outputs /shared/runs --gpus 0 1 2,3
    FOUNDRY_UI_TOKEN=... foundry-ui --host 0.0.0.0   # a login node: open the printed address (it carries the token)
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import sys
from pathlib import Path


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="foundry-ui", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", nargs="+", default=["outputs"], help="run folders to show (the first gets new runs)")
    ap.add_argument("--data", default="foundry-ui-data", help="uploads, shards made from them, the job database")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--token", default=os.environ.get("FOUNDRY_UI_TOKEN"),
                    help="required unless bound to loopback (default: $FOUNDRY_UI_TOKEN); 'new' makes one")
    ap.add_argument("--gpus", nargs="*", default=None,
                    help="GPU sets, one job each at a time (e.g. 0 1 2,3); default: one set, every device")
    ap.add_argument("--slurm", action="store_true", help="also let the queue submit sbatch scripts the launcher wrote")
    args = ap.parse_args(argv)
    token = secrets.token_urlsafe(24) if args.token == "new" else args.token
    if not is_loopback(args.host) and not token:
        sys.exit(f"foundry-ui: --host {args.host} is reachable from other machines; set a token "
                 "(--token new, or FOUNDRY_UI_TOKEN) or bind 127.0.0.1")
    outputs = [Path(p) for p in args.outputs]
    for p in outputs:
        p.mkdir(parents=True, exist_ok=True)

    # the web stack and the engine (torch) load only past the refusal above, which stays instant
    import uvicorn

    from ui.app import create_app  # lazy: see above

    hosts = ["127.0.0.1", "localhost", args.host] + (["*"] if args.host in ("0.0.0.0", "::") else [])
    app = create_app(outputs, Path(args.data), token=token, slots=args.gpus, slurm=args.slurm, allowed_hosts=hosts)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"foundry-ui: http://{shown}:{args.port}/" + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
