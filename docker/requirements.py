"""Print the app's dependencies from pyproject.toml, one per line, for the
deployment images: Flower without its simulation extra (Ray is not used when
SuperNodes are real processes), everything else as declared."""

import sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib


def requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d.replace("flwr[simulation]", "flwr") for d in deps]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")))
