"""The depth/width overrides that match an arch to a parameter budget (the search: lab/models/sizes.py).

    python -m lab.sizing arch=<name> target=50e6 [basis=non_embedding] [vary=num_hidden_layers,hidden_size]
                        [tolerance=0.01] [any lab.train override, e.g. tokenizer=bpe2k]

prints the Hydra overrides that build the matched model, so a bake-off at 50M or 1B is one override.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from omegaconf import OmegaConf

from lab import CONF_DIR, LabError, report_error
from lab.models.arch import apply_size
from lab.models.sizes import match_size

_CLI_KEYS = {"target", "basis", "vary", "tolerance"}


def _compose(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=str(CONF_DIR)):
        try:
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        except Exception as err:  # Hydra's own message names the bad override
            raise LabError(f"cannot compose conf/train.yaml with {overrides}: {err}") from None
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    size = OmegaConf.to_container(cfg.size, resolve=True)
    choices = cfg.hydra.runtime.choices
    return arch, size, str(choices.get("arch")), str(choices.get("size"))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(__doc__.strip().split("\n\n")[1] if __doc__ else "")
        return 0 if args else 2
    ours = {k: v for k, _, v in (a.partition("=") for a in args) if k in _CLI_KEYS}
    rest = [a for a in args if a.partition("=")[0] not in _CLI_KEYS]
    try:
        if "target" not in ours:
            raise LabError("target=<params> is required, e.g. target=50e6")
        arch, size, arch_name, size_name = _compose(rest)
        start = apply_size(arch, size)
        match = match_size(start, float(ours["target"]) if _is_number(ours["target"]) else ours["target"],
                           vary=tuple(v for v in ours["vary"].split(",") if v) if "vary" in ours else None,
                           # basis and tolerance: match_size's own defaults unless given
                           **({"basis": ours["basis"]} if "basis" in ours else {}),
                           **({"tolerance": float(ours["tolerance"])} if "tolerance" in ours else {}))
    except Exception as err:  # noqa: BLE001 - the one exit path (lab.exit_with)
        return report_error(err, logging.getLogger("lab.sizing"))
    # overrides relative to the arch as written, so they rebuild the match under size=full
    changed = {k: v for k, v in match.node.items() if arch.get(k) != v}
    lines = [f"# {arch_name}: {match.total / 1e6:.2f}M params total, {match.non_embedding / 1e6:.2f}M "
             f"non-embedding (target {match.target / 1e6:.2f}M {match.basis}, {match.rel_error:+.2%}) "
             f"at vocab_size={match.node.get('vocab_size')}"]
    prefix = [] if size_name in ("full", "None") else ["size=full"]
    lines.append(" ".join([*prefix, *(f"arch.{k}={v}" for k, v in sorted(changed.items()))]))
    print("\n".join(lines))
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
