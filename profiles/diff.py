"""diff(old, new) -> ReloadPlan: what a profile edit changes, so a reload touches only that.

A model whose load-relevant settings changed is reloaded; one where only aliases, ttl, pin,
preload or sampling defaults changed gets a metadata update and keeps its weights in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .schema import Profile


@dataclass(frozen=True)
class ModelChange:
    model_id: str
    needs_reload: bool
    fields: tuple[str, ...]


@dataclass(frozen=True)
class ReloadPlan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[ModelChange, ...] = ()
    sections: tuple[str, ...] = field(default=())  # top-level sections that changed: server, auth, ...

    @property
    def reloaded(self) -> tuple[str, ...]:
        return tuple(c.model_id for c in self.changed if c.needs_reload)

    @property
    def metadata_only(self) -> tuple[str, ...]:
        return tuple(c.model_id for c in self.changed if not c.needs_reload)

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.sections)

    def summary(self) -> str:
        if self.is_empty:
            return "no changes"
        parts = []
        for label, ids in (
            ("added", self.added),
            ("removed", self.removed),
            ("reload", self.reloaded),
            ("metadata", self.metadata_only),
            ("sections", self.sections),
        ):
            if ids:
                parts.append(f"{label}: {', '.join(ids)}")
        return "; ".join(parts)


def diff(old: Profile, new: Profile) -> ReloadPlan:
    added = tuple(m for m in new.models if m not in old.models)
    removed = tuple(m for m in old.models if m not in new.models)
    changed: list[ModelChange] = []
    for mid in new.models:
        if mid not in old.models:
            continue
        before, after = old.models[mid].model_dump(), new.models[mid].model_dump()
        fields = tuple(k for k in after if before.get(k) != after[k])
        if not fields:
            continue
        load_fields = set(type(new.models[mid]).LOAD_FIELDS)
        changed.append(ModelChange(mid, any(f in load_fields for f in fields), fields))
    changed = _propagate_draft_reloads(new, changed, set(removed), set(added))
    sections = tuple(
        name for name in ("server", "apis", "auth", "metrics") if getattr(old, name) != getattr(new, name)
    )
    return ReloadPlan(added, removed, tuple(changed), sections)


def _propagate_draft_reloads(
    new: Profile, changed: list[ModelChange], removed: set[str], added: set[str]
) -> list[ModelChange]:
    """A model whose draft model reloads must reload too: it holds the draft's weights."""
    reloading = {c.model_id for c in changed if c.needs_reload} | removed
    out = []
    for change in changed:
        spec = new.models[change.model_id]
        draft = spec.speculative.draft_model if spec.speculative else None
        if not change.needs_reload and draft in reloading:
            change = ModelChange(
                change.model_id, True, change.fields + ("speculative.draft_model (reloaded)",)
            )
        out.append(change)
    seen = {c.model_id for c in out}
    for mid, spec in new.models.items():
        draft = spec.speculative.draft_model if spec.speculative else None
        if mid not in seen and mid not in added and draft in reloading:
            out.append(ModelChange(mid, True, ("speculative.draft_model (reloaded)",)))
    return out
