# An example Harbor strategy in Python: round-robin over the healthy backends, by the pick's
# sequence number. Built into a WebAssembly component with componentize-py (see README.md);
# the contract is ../../wit/strategy/strategy.wit.
#
# How the contract looks from Python: the export is a class named after the interface, with a
# method per function in snake_case; records are dataclasses with snake_case fields; an option
# is a value or None; a `result` error is raised as `Err(reason)`. The `load` import would be
# `from wit_world.imports import load` (`load.in_flight(index)`); this strategy does not need it.

import json
from typing import List, Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import Backend, Description, Outcome, PickPlan

NAME = "example-py"

# Each route's backends as their health flags, by the host's route number.
routes: dict[int, List[bool]] = {}


def no_settings(text: str) -> None:
    """This strategy has no settings: `{}` is all it accepts, plugin-wide or for a route."""
    settings = json.loads(text.strip() or "{}")
    if settings:
        raise Err(f"{NAME} has no settings; give {{}}, not {json.dumps(settings)}")


def choose(route: int, sequence: int, exclude: List[int]) -> Optional[int]:
    """The backend in turn among the healthy ones not excluded (any not excluded when none of
    them is healthy, as the contract asks); None when every backend is excluded."""
    healthy = routes.get(route, [])
    usable = [i for i in range(len(healthy)) if i not in exclude]
    candidates = [i for i in usable if healthy[i]] or usable
    if not candidates:
        return None
    return candidates[sequence % len(candidates)]


class Strategy(exports.Strategy):
    def describe(self) -> Description:
        return Description(name=NAME, version="0.1.0", wants_outcomes=False, uses_hash_key=False)

    def configure(self, config: str) -> None:
        no_settings(config)

    def configure_route(self, route: int, settings: str) -> None:
        no_settings(settings)

    def rebuild(self, route: int, backends: List[Backend]) -> Optional[PickPlan]:
        routes[route] = [b.healthy for b in backends]
        # No plan: the host calls `pick` for every request. (Round-robin could return a table
        # instead, and the host would pick without calling Python at all.)
        return None

    def forget(self, route: int) -> None:
        routes.pop(route, None)

    def pick(self, route: int, sequence: int, entropy: int, hash_key: Optional[int]) -> Optional[int]:
        return choose(route, sequence, [])

    def retry(
        self, route: int, sequence: int, entropy: int, hash_key: Optional[int], exclude: List[int]
    ) -> Optional[int]:
        return choose(route, sequence, exclude)

    def done(self, route: int, index: int, outcome: Outcome, latency_ns: int) -> None:
        pass  # Not called: describe() does not ask for outcomes.
