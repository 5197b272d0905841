"""``lora-search dashboard``: optuna-dashboard on the study's storage, 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import argparse
import sys

from search.cli._common import add_study_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dashboard", help="optuna-dashboard on the study's storage, with the contact sheets as artifacts",
        description="Serves optuna-dashboard for the study (params, constraint reasons, per-epoch scores, "
                    "best epoch, contact-sheet images). Listens on 127.0.0.1 only unless --host says otherwise.")
    add_study_options(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.dashboard import is_loopback, make_dashboard_server
    from search.study import open_study, redact, storage_url

    settings = settings_from_args(args)
    open_study(settings, create=False)  # an unknown study or a bad storage is one clear line, not a blank page
    server = make_dashboard_server(settings, args.host, args.port)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    print(f"optuna-dashboard for study '{settings.study.name}' ({redact(storage_url(settings))}) at "
          f"http://{shown}:{server.server_port}/dashboard/  (Ctrl-C stops it)", flush=True)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this port can read and change the study",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("dashboard stopped")
    finally:
        server.server_close()
    return 0
