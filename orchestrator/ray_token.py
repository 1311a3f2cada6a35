"""Make sure Ray's authentication token exists, readable by its owner only, before `ray start --head`.

With RAY_AUTH_MODE=token (the Makefile exports it), Ray 2.60's `ray start --head` refuses to start without a token
(it creates none itself), and the token file gates everything the cluster runs. Ray looks for the token in
RAY_AUTH_TOKEN (the value), else the file named by RAY_AUTH_TOKEN_PATH, else `~/.ray/auth_token`. A missing
default file is created by Ray's own `ray get-auth-token --generate`, run under umask 077 since Ray writes it
with the default umask (world-readable on most systems); an existing file keeps its token and is narrowed to
mode 0600. The token itself is never printed.

Run as `python -m orchestrator.ray_token` (what `make cluster` does).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

DEFAULT_TOKEN_PATH = Path(".ray") / "auth_token"


def token_path() -> Path:
    """The token file Ray reads: RAY_AUTH_TOKEN_PATH if set, else ~/.ray/auth_token."""
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / DEFAULT_TOKEN_PATH


def ray_cli() -> str:
    """The `ray` command of the Python running this (the venv's), whatever PATH holds."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


def ensure_token() -> str:
    """Create the token file if none exists, make it owner-only, and return one line saying where it is.

    Raises RuntimeError naming the file and the fix when the token cannot be provided.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "Ray auth token: from the RAY_AUTH_TOKEN environment variable (no file used)"
    path = token_path()
    created = False
    if not path.exists():
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist: write the cluster's token "
                               "there (mode 0600), or unset RAY_AUTH_TOKEN_PATH to use ~/.ray/auth_token")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        done = subprocess.run([ray_cli(), "get-auth-token", "--generate"], env=env, umask=0o077,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(f"`ray get-auth-token --generate` did not create {path} (exit {done.returncode}): "
                               f"{done.stderr.strip()[-500:]}")
        created = True
    if not path.is_file() or not path.read_text().strip():
        raise RuntimeError(f"Ray token file {path} is empty or not a file: delete it and run `make cluster` again "
                           "(a new token is generated; clients must then use the new one)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o600:
        path.chmod(0o600)
    how = "created" if created else "existing" if mode == 0o600 else f"existing; mode {mode:04o} narrowed to"
    return f"Ray auth token: {path} ({how} 0600)"


def main() -> int:
    try:
        print(ensure_token())
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
