"""``flowbp pipeline run``: the orchestration layer's command, registered with the ``flowbp`` CLI through the
``flowbp.pipeline_commands`` entry point (pyproject.toml), so the library never imports the orchestration layer."""

from __future__ import annotations

import argparse
import json


def add_run_command(pipeline_commands, common) -> None:
    what = "materialize the default chain through Dagster (prepare, each method, compare, promote)"
    r = pipeline_commands.add_parser("run", help=what, description=what)
    common(r)
    r.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run_chain

    result = run_chain(args.params, args.set)
    print(json.dumps(result, indent=2, default=str))
    return 0 if result["success"] else 1
