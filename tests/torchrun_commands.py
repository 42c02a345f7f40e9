"""Run several ``vsink`` command lines one after another in each process ``torchrun`` starts: one
launch for the suite's 2-process checks instead of one per command (each launch pays for starting
the interpreters, the imports and the rendezvous).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrun_commands.py PLAN DIR

``PLAN``: a JSON object ``{name: [arguments of vsink]}``. Each command runs through
:func:`vsink.cli.main` as ``torchrun -m vsink`` runs it, except that the process group the first
one joins is kept for the next ones and left at the end (joining again after leaving hung here, in
torch's rendezvous store); its exit code, stdout and stderr go to ``DIR/<name>.rank<R>.rc|out|err``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


def run(plan_file: str, out_dir: str) -> None:
    import vsink.shard
    from vsink.cli import main

    leave, vsink.shard.leave = vsink.shard.leave, lambda: None
    rank = os.environ.get("RANK", "0")
    out = Path(out_dir)
    for name, args in json.loads(Path(plan_file).read_text()).items():
        with open(out / f"{name}.rank{rank}.out", "w") as stdout, open(out / f"{name}.rank{rank}.err", "w") as stderr:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = main(args)
        (out / f"{name}.rank{rank}.rc").write_text(str(code))
    leave()


if __name__ == "__main__":
    run(*sys.argv[1:3])
