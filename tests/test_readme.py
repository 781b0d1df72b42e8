"""The README's first command runs offline on a fresh checkout and prints what the README quotes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_command_and_output() -> tuple[str, str]:
    """The README's first bash block's generate command (after `pip install -e . && `) and the
    text block that follows it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    after = readme[readme.index(command) + len(command) :]
    quoted = re.search(r"```text\n(.*?)```", after, re.S).group(1)
    install, _, generate = command.partition(" && ")
    assert install == "pip install -e .", install
    return generate, quoted


def test_the_first_command_prints_the_quoted_text(tmp_path):
    command, quoted = first_command_and_output()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/generate.py"] and argv[argv.index("--model") + 1] == "tiny"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GPT2NP_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONIOENCODING"] = "utf-8"
    # The command as the README gives it, run by bash (its $'...' prompt is bash's quoting), with
    # this interpreter as `python`.
    command = shlex.quote(sys.executable) + command[len("python") :]
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == quoted, f"the README quotes\n{quoted!r}\nthe command printed\n{result.stdout!r}"
    assert not (tmp_path / "hf").exists()  # nothing was downloaded or cached
