"""Shared start-up for every binary: absl flags, logging, JAX's CPU devices, user errors."""

import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from modit_jax import engine
from modit_jax import errors
from modit_jax import stopping

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None,
    "JAX devices the CPU is split into; training is data-parallel over them (batch sizes must "
    f"be divisible by it). Default: {engine.DEFAULT_CPU_DEVICES}, unless XLA_FLAGS "
    "(--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES set it. No effect on "
    "GPU or TPU.")


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of libraries that log every checkpoint step (warnings still pass)."""

  _NOISY = ("/orbax/", "/jax/_src/")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self._NOISY)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """Runs an absl `main`: a `UserError` is one clear line and exit code 2; a stop on a signal
  (`stopping.TrainingStopped`) is one line and exit code 128 + the signal's number."""

  def guarded_main(argv: Sequence[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
      sys.stderr.write(f"error: unexpected positional arguments: {' '.join(argv[1:])}\n")
      sys.exit(2)
    try:
      # Before main: the device count is fixed when JAX first touches a device.
      engine.configure_cpu_devices(_CPU_DEVICES.value)
      main(argv)
    except errors.UserError as e:
      logging.flush()
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)
    except stopping.TrainingStopped as e:
      # Asked for (SIGTERM, Ctrl-C): one line, and the exit code a shell gives that signal.
      logging.flush()
      sys.stderr.write(f"{e}\n")
      sys.exit(e.exit_code)
    except BrokenPipeError:
      # Whoever read stdout stopped (`... | head`): nothing went wrong here. Point stdout at
      # /dev/null so that the interpreter's final flush does not raise again.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      sys.exit(1)

  app.run(guarded_main)
