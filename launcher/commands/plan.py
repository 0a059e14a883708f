"""Placeholder: replaced by the module's owner."""

import argparse
from typing import Any


def register(sub: "argparse._SubParsersAction[Any]") -> None:
    pass
