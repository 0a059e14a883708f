"""Several models over one inventory: every model placed at once, whole GPUs per replica.

Pure like ``planner.plan``, which it calls for each model's share: that share is a sub-inventory
(the GPUs still free, or the ids the user pinned), so each model keeps the single-model rules
(smallest TP that fits, TP groups on one NUMA node / NVLink island, the context it allows).

The order is what makes a shared box work:

1. models pinned to GPU ids take exactly those;
2. models with a replica or GPU count, widest TP first (a TP4 group needs four GPUs of one
   island; placed last it would find the island split by TP1 replicas);
3. models that asked for ``replicas: auto`` share what is left, one replica each in turn, so
   two of them split the rest evenly instead of the first taking it all.

A plan that asks for more GPUs than there are is refused before any placement, with each
model's count (replicas x TP) in the message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from vllm_fleet.launcher.errors import PlanError
from vllm_fleet.launcher.plan_types import (
    FleetPlan,
    Inventory,
    ModelPlan,
    ModelRequest,
    ModelSize,
    Plan,
    PlanOptions,
)
from vllm_fleet.launcher.planner import plan

AUTO = "auto"


def plan_models(
    inventory: Inventory,
    sizes: Mapping[str, ModelSize | None],
    requests: Sequence[ModelRequest],
) -> FleetPlan:
    """Place every requested model on ``inventory`` (``sizes`` by ``ModelRequest.name``)."""
    if not requests:
        raise PlanError("models: empty; list at least one model, e.g. models: [{model: NAME}]")
    names = [r.name for r in requests]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise PlanError(
                f"models[{i}]: {name!r} is served twice; give each model its own served_model_name"
            )
    if len(requests) == 1 and not requests[0].gpu_ids and requests[0].gpu_count is None:
        return _single(inventory, sizes, requests[0])
    return _Placement(inventory, sizes, requests).run()


def _single(
    inventory: Inventory, sizes: Mapping[str, ModelSize | None], req: ModelRequest
) -> FleetPlan:
    """One model: exactly the single-model plan (replica names as before, ``replica-i``)."""
    count = req.replicas if isinstance(req.replicas, int) else None
    layout = plan(inventory, sizes.get(req.name), dataclasses.replace(req.options, replicas=count))
    lora = _lora_paths(req)
    replicas = tuple(
        dataclasses.replace(r, served_model=req.name, lora_paths=lora) for r in layout.replicas
    )
    layout = dataclasses.replace(layout, replicas=replicas)
    asked = "as many as fit" if count is None else str(count)
    return FleetPlan(
        inventory=inventory,
        models=(ModelPlan(req.name, req.options, layout, asked),),
        leftover_gpus=layout.leftover_gpus,
        notes=layout.notes,
    )


def slug(name: str) -> str:
    """A replica name part from a model name: container, compose service and DNS safe."""
    text = re.sub(r"[^a-z0-9]+", "-", name.rsplit("/", 1)[-1].lower()).strip("-")
    return text[:40].rstrip("-") or "model"


def _lora_paths(req: ModelRequest) -> tuple[str, ...]:
    return tuple(path for _, path in req.options.lora_modules)


def _asked(req: ModelRequest) -> str:
    if req.gpu_ids:
        return "GPUs " + ",".join(map(str, req.gpu_ids))
    if req.gpu_count is not None:
        return f"{req.gpu_count} GPUs"
    if req.replicas in (None, AUTO):
        return AUTO if req.replicas == AUTO else "1 (default)"
    return str(req.replicas)


class _Placement:
    """One multi-model planning run: the free GPUs and the next port, taken model by model."""

    def __init__(
        self,
        inventory: Inventory,
        sizes: Mapping[str, ModelSize | None],
        requests: Sequence[ModelRequest],
    ) -> None:
        self.inventory = inventory
        self.sizes = sizes
        self.requests = list(requests)
        self.free = {g.index: g for g in inventory.gpus}
        self.port = requests[0].options.base_port
        self.placed: dict[str, list[Plan]] = {r.name: [] for r in requests}
        #: each model's TP size on the whole inventory (what the over-subscription check counts).
        self.tp: dict[str, int] = {}

    # ---------------------------------------------------------------- the run

    def run(self) -> FleetPlan:
        for req in self.requests:
            self.tp[req.name] = self._probe(req)
        self._check_subscription()
        on_gpus = [r for r in self.requests if self._uses_gpus(r)]
        pinned = [r for r in on_gpus if r.gpu_ids]
        counted = [
            r for r in on_gpus if not r.gpu_ids and (r.gpu_count is not None or r.replicas != AUTO)
        ]
        counted.sort(key=lambda r: -self.tp[r.name])
        autos = [r for r in on_gpus if r not in pinned and r not in counted]
        for req in pinned:
            self._place_pinned(req)
        for req in counted:
            self._place_counted(req)
        self._fill(autos)
        for req in self.requests:
            if not self._uses_gpus(req):
                self._place_gpuless(req)
        return self._result()

    def _uses_gpus(self, req: ModelRequest) -> bool:
        return bool(self.inventory.gpus) and req.options.engine == "vllm"

    def _probe(self, req: ModelRequest) -> int:
        """Plan the model alone on the whole inventory: a model that fits nowhere fails here,
        named; otherwise its TP size."""
        options = dataclasses.replace(req.options, replicas=None)
        try:
            layout = plan(self._sub(self.inventory.gpus), self.sizes.get(req.name), options)
        except PlanError as exc:
            raise PlanError(f"model {req.name}: {exc}") from None
        return layout.tensor_parallel_size

    def _check_subscription(self) -> None:
        wanted: list[tuple[ModelRequest, int]] = []
        for req in self.requests:
            if not self._uses_gpus(req):
                continue
            tp = self.tp[req.name]
            if req.gpu_ids:
                need = len(req.gpu_ids)
            elif req.gpu_count is not None:
                need = req.gpu_count
            else:
                need = max(_count(req), 1 if req.replicas == AUTO else 0) * tp
            wanted.append((req, need))
        total = sum(n for _, n in wanted)
        have = len(self.inventory.gpus)
        if total > have:
            parts = ", ".join(
                f"{r.name} {self._need_text(r, n)}" for r, n in wanted if n or r.replicas == AUTO
            )
            raise PlanError(
                f"models need {total} GPUs, the inventory has {have}: {parts}; lower replicas "
                "or gpus of a model, or use replicas: auto for the ones that may shrink"
            )

    def _need_text(self, req: ModelRequest, need: int) -> str:
        if req.gpu_ids or req.gpu_count is not None:
            return f"{need} GPUs ({_asked(req)})"
        tp = self.tp[req.name]
        count = need // tp if tp else need
        auto = " (auto: at least one)" if req.replicas == AUTO else ""
        return f"{count}x TP{tp} = {need} GPUs{auto}"

    # ---------------------------------------------------------------- placements

    def _sub(self, gpus: Sequence[object]) -> Inventory:
        return dataclasses.replace(self.inventory, gpus=tuple(gpus))  # type: ignore[arg-type]

    def _plan_on(self, req: ModelRequest, gpu_ids: Sequence[int], replicas: int | None) -> Plan:
        inventory = self._sub([self.free[i] for i in sorted(gpu_ids)])
        options = dataclasses.replace(req.options, replicas=replicas, base_port=self.port)
        layout = plan(inventory, self.sizes.get(req.name), options)
        for replica in layout.replicas:
            for index in replica.gpus:
                del self.free[index]
        self.port += len(layout.replicas)
        self.placed[req.name].append(layout)
        return layout

    def _place_pinned(self, req: ModelRequest) -> None:
        index = self.requests.index(req)
        known = {g.index for g in self.inventory.gpus}
        for gpu in req.gpu_ids:
            if gpu not in known:
                raise PlanError(
                    f"models[{index}].gpus: GPU {gpu} is not in the inventory (GPUs "
                    f"{','.join(map(str, sorted(known)))}); list GPUs that exist"
                )
            if gpu not in self.free:
                owner = self._owner(gpu)
                raise PlanError(
                    f"models[{index}].gpus: GPU {gpu} is already {owner}'s; give each model "
                    "its own GPUs"
                )
        try:
            self._plan_on(req, req.gpu_ids, None)
        except PlanError as exc:
            raise PlanError(
                f"models[{index}] ({req.name}) on GPUs {list(req.gpu_ids)}: {exc}"
            ) from None

    def _owner(self, gpu: int) -> str:
        for name, plans in self.placed.items():
            if any(gpu in r.gpus for p in plans for r in p.replicas):
                return name
        return "another model"

    def _place_counted(self, req: ModelRequest) -> None:
        tp = self.tp[req.name]
        if req.gpu_count is not None:
            if req.gpu_count % tp:
                raise PlanError(
                    f"model {req.name}: gpus {req.gpu_count} is not a multiple of its "
                    f"tensor-parallel size {tp}; use gpus: {req.gpu_count // tp * tp or tp}"
                )
            count = req.gpu_count // tp
        else:
            count = _count(req)
        try:
            self._plan_on(req, list(self.free), count)
        except PlanError as exc:
            raise PlanError(
                f"model {req.name}: {count}x TP{tp} do not fit on the {len(self.free)} GPUs "
                f"left ({','.join(map(str, sorted(self.free))) or 'none'}) after the models "
                f"placed before it: {exc}"
            ) from None

    def _fill(self, autos: list[ModelRequest]) -> None:
        """Replicas of the auto models, one each in turn, while any still fits."""
        active = list(autos)
        for _ in range(len(self.inventory.gpus) + 1):
            if not active:
                break
            for req in list(active):
                try:
                    layout = self._plan_on(req, list(self.free), 1) if self.free else None
                except PlanError:
                    layout = None
                if layout is None or not layout.replicas:
                    active.remove(req)
        for req in autos:
            if not self.placed[req.name]:
                raise PlanError(
                    f"model {req.name}: replicas: auto, but no replica of TP"
                    f"{self.tp[req.name]} fits on the GPUs left by the other models; give it "
                    "gpus: or lower the others' replicas"
                )

    def _place_gpuless(self, req: ModelRequest) -> None:
        """The sim engine, or vLLM's CPU engine when there is no GPU: a count, default one.

        CPU replicas of several models share the host's CPUs: each model plans with its share,
        so every replica's OpenMP threads come out as if one model had them all."""
        count = max(_count(req), 1)
        inventory = self.inventory
        cpus = inventory.cpus
        if cpus is not None and not inventory.gpus:
            total = sum(max(_count(r), 1) for r in self.requests if not self._uses_gpus(r))
            inventory = dataclasses.replace(inventory, cpus=max(1, cpus * count // total))
        options = dataclasses.replace(req.options, replicas=count, base_port=self.port)
        layout = plan(inventory, self.sizes.get(req.name), options)
        self.port += len(layout.replicas)
        self.placed[req.name].append(layout)

    # ---------------------------------------------------------------- result

    def _result(self) -> FleetPlan:
        models = []
        taken = {slug(r.name) for r in self.requests}
        for i, req in enumerate(self.requests):
            plans = self.placed[req.name]
            base = plans[0]
            prefix = slug(req.name)
            if len(taken) < len(self.requests):  # two names with one slug: number them
                prefix = f"{prefix}-m{i}"
            replicas = [r for p in plans for r in p.replicas]
            renamed = tuple(
                dataclasses.replace(
                    r, name=f"{prefix}-{k}", served_model=req.name, lora_paths=_lora_paths(req)
                )
                for k, r in enumerate(replicas)
            )
            # auto models are planned one replica at a time: the first plan's notes say why.
            kept = tuple(n for n in base.notes if "unused" not in n)
            layout = dataclasses.replace(
                base, replicas=renamed, leftover_gpus=(), notes=kept, inventory=self.inventory
            )
            models.append(ModelPlan(req.name, req.options, layout, _asked(req)))
        leftover = tuple(sorted(self.free))
        notes: list[str] = []
        if leftover:
            notes.append(
                f"GPUs {','.join(map(str, leftover))} unused: no model asked for them (give "
                "one replicas: auto to fill them)"
            )
        return FleetPlan(self.inventory, tuple(models), leftover, tuple(notes))


def _count(req: ModelRequest) -> int:
    """The replica count asked for: unset is one (in a fleet of several models), auto 0."""
    if isinstance(req.replicas, int):
        return req.replicas
    return 0 if req.replicas == AUTO else 1


def replica_options(fleet: FleetPlan) -> dict[str, PlanOptions]:
    """Each replica's model options by replica name (for printing its command)."""
    return {r.name: m.options for m in fleet.models for r in m.plan.replicas}


__all__ = ["AUTO", "FleetPlan", "ModelRequest", "plan_models", "replica_options", "slug"]
