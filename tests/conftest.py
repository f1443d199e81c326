"""Pytest set-up shared by every test; pytest imports this before any test module."""

import os

# Eight forced host devices for the whole session, so sharded code is exercised on CPU. This
# must happen before jax is imported anywhere: XLA reads the flag once, at backend start-up.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
