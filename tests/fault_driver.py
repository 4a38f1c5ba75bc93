"""Runs ``main_task_retrieval.main`` with one injected fault, for tests/test_preemption.py.

    python -m tests.fault_driver MODE N [main_task_retrieval flags...]

MODE ``none``: no fault. ``kill_after_step``: SIGKILL this process right after its N-th
optimizer step (before anything of that step is saved). ``kill_in_save``: on the N-th atomic
file write of this process, write half of the bytes to the temporary file, then SIGKILL (a
kill while a checkpoint is being written). ``sigterm_in_step``: send SIGTERM to this process at
the start of its N-th step (it arrives during the step, as a scheduler's would).
"""
import io
import os
import signal
import sys

import torch

import atomic_io
import main_task_retrieval
import training
import util

MODES = ("none", "kill_after_step", "kill_in_save", "sigterm_in_step")


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(mode: str, n: int) -> None:
    """Patch the step / the atomic writer so that the fault happens at the N-th call."""
    calls = {"count": 0}
    if mode in ("kill_after_step", "sigterm_in_step"):
        step = training.train_step

        def faulty_step(trainer, micro_batches):
            calls["count"] += 1
            if mode == "sigterm_in_step" and calls["count"] == n:
                os.kill(os.getpid(), signal.SIGTERM)
            out = step(trainer, micro_batches)
            if mode == "kill_after_step" and calls["count"] == n:
                _kill()
            return out

        training.train_step = faulty_step
    elif mode == "kill_in_save":
        save = util.save_torch

        def faulty_save(obj, path):
            calls["count"] += 1
            if calls["count"] != n:
                return save(obj, path)
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            with open(atomic_io.temp_path(path), "wb") as f:  # the writer's own temporary, half written
                f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            _kill()

        util.save_torch = faulty_save
    elif mode != "none":
        raise SystemExit(f"fault mode {mode!r} is unknown; use one of {MODES}")


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]))
    main_task_retrieval.main(sys.argv[3:])
