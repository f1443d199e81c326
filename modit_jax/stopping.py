"""Stopping a training run cleanly: SIGTERM (preemption) or Ctrl-C, at a step boundary.

Schedulers (Slurm, Kubernetes, preemptible TPU and GPU VMs) send SIGTERM some seconds before
they kill a job. `StopRequests` turns that, or a first Ctrl-C, into a request that the training
loop sees after the update in flight: it saves a checkpoint there and raises `TrainingStopped`,
so rerunning the same command resumes from that step instead of the last periodic checkpoint.

With one process, Python signal handlers catch the signal. With several (after
`jax.distributed.initialize`), they would stop one process while the others wait in a
collective, so JAX's preemption service is used instead: it hears SIGTERM on any process and
makes every process agree on the same step (`multihost_utils.reached_preemption_sync_point`).
"""

import signal
import threading
import types
from typing import Any

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
  """Training stopped on request (a signal) after `step` updates; not an error in the run."""

  def __init__(self, reason: str, signal_number: int, step: int, num_steps: int,
               saved_step: int | None, checkpoint_dir: str, resume_every: int = 1):
    self.reason, self.signal_number, self.step = reason, signal_number, step
    self.saved_step, self.checkpoint_dir = saved_step, checkpoint_dir
    if saved_step == step:
      where = f"its checkpoint is in {checkpoint_dir}"
    elif saved_step is not None:
      where = (f"the last checkpoint is step {saved_step} in {checkpoint_dir} (this run resumes "
               f"exactly only from a multiple of {resume_every} steps)")
    else:
      where = (f"no checkpoint was saved (this run resumes exactly only from a multiple of "
               f"{resume_every} steps), so a rerun starts from step 0")
    super().__init__(f"stopped by {reason} after step {step} of {num_steps}: {where}; run the "
                     "same command again to resume")

  @property
  def exit_code(self) -> int:
    """The shell's code for a process ended by this signal: 128 + its number."""
    return 128 + self.signal_number


class StopRequests:
  """A context manager that notes SIGTERM / SIGINT; `requested(step)` says when to stop.

  Call `requested` after every update, on every process (with several processes it is a
  synchronisation point of JAX's preemption service). The first signal is only noted; the
  previous handlers come back at once, so a second Ctrl-C interrupts as usual.
  """

  def __init__(self):
    self._signal: int | None = None
    self._previous: dict[int, Any] = {}
    self._multiprocess = False

  def __enter__(self) -> "StopRequests":
    self._multiprocess = jax.process_count() > 1
    # Handlers can only be set from the main thread; elsewhere the loop runs without them.
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for number in _SIGNALS:
        self._previous[number] = signal.signal(number, self._note)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._restore()

  def _note(self, number: int, frame: types.FrameType | None) -> None:
    del frame
    self._signal = number
    self._restore()

  def _restore(self) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous.clear()

  def requested(self, step: int) -> bool:
    """Whether the run should stop now, after `step` updates."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self._signal = signal.SIGTERM
      except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
        return False
    return self._signal is not None

  @property
  def reason(self) -> str:
    """What asked for the stop, in words."""
    if self._signal is None:
      return "nothing"
    name = signal.Signals(self._signal).name
    return f"a preemption notice ({name})" if self._multiprocess else name

  @property
  def signal_number(self) -> int:
    return int(self._signal or 0)
