"""The model card (``README.md``) written beside a published adapter."""
from __future__ import annotations

import json
from typing import Any


def model_card(name: str, entry: dict[str, Any], meta: dict[str, Any]) -> str:
    bb = entry["backbone"]
    methods = "\n".join(f"- **{m['name']}**: `{json.dumps(m.get('config', {}), sort_keys=True)}`" for m in entry["method"]) or "- (none)"
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in entry["metrics"].items())
    task = entry["task"] if not isinstance(entry["task"], dict) else " / ".join(f"{k}: {v}" for k, v in entry["task"].items())
    pre = meta.get("preprocessing") or {}
    return f"""# {name}

{entry.get('description') or 'An adapter trained with Adapter Zoo.'}

| | |
|---|---|
| kind | adapter |
| backbone | `{bb['family']}` / `{bb['model']}` (weights `{bb.get('weights_tag')}`) |
| backbone options | `{json.dumps(bb.get('kwargs') or {}, sort_keys=True)}` |
| base-weight fingerprint | `{bb.get('fingerprint')}` |
| head | `{json.dumps(entry.get('head'), sort_keys=True)}` |
| task | {task or 'unspecified'} |
| stored parameters | {entry['stored_parameters']:,} |
| licence | {entry.get('licence') or 'unspecified'} |
| library | adapter-zoo {(entry.get('library') or {}).get('version', '?')} |

## Methods

{methods}

## Metrics

| metric | value |
|---|---|
{metrics or '| (none) | |'}

## Preprocessing

`{json.dumps(pre, sort_keys=True)}`

## Use

```python
import zoo
model = zoo.from_zoo("{name}")          # backbone + adapter + head, eval mode
# or continue training:  python train.py ... adapter.init_from=zoo:{name}
```

Files: `adapter.safetensors` (adapter and head tensors only, safetensors), `adapter.json` (config).
"""
