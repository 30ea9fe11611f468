"""Write environment.yml and workflow/envs/continual-bench.yaml from requirements.lock (the one source of pins).

conda cannot install the CUDA wheels' exact builds from conda-forge, so both files let conda provide
Python and pip, and pip install the locked versions. tests/test_environment.py checks they stay in sync.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "# Generated from requirements.lock by tools/sync_envs.py (make envs); do not edit by hand.\n"


def pins() -> list[str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def render(name: str, extra_pip: list[str]) -> str:
    out = [HEADER, f"name: {name}\n", "channels:\n  - conda-forge\n", "dependencies:\n",
           "  - python=3.11\n", "  - pip\n", "  - pip:\n"]
    out += [f"      - {p}\n" for p in pins() + extra_pip]
    return "".join(out)


def main() -> None:
    (ROOT / "environment.yml").write_text(render("continual-bench", ["-e ."]))
    (ROOT / "workflow/envs/continual-bench.yaml").write_text(render("continual-bench-rules", []))


if __name__ == "__main__":
    main()
