"""Names and helpers shared by the telltale task tests (test_tasks_load.py, test_tasks_e2e.py)."""

from __future__ import annotations

from lm_eval_telltale.scoring import BBH_KINDS
from lm_eval_telltale.taskdata import GSM_PLUS_TYPES, MMLU_PRO_SUBJECTS

#: what a user asks for: every task family, groups included
TOP_LEVEL = [
    "telltale_gsm8k",
    "telltale_gsm_plus",
    "telltale_gsm_plus_mini",
    "telltale_aime24",
    "telltale_aime24_k8",
    "telltale_bbh",
    "telltale_mmlu_pro",
]

#: group -> its subtasks
GROUPS: dict[str, list[str]] = {
    "telltale_gsm_plus": [f"telltale_gsm_plus_{s}" for s in GSM_PLUS_TYPES],
    "telltale_gsm_plus_mini": [f"telltale_gsm_plus_mini_{s}" for s in GSM_PLUS_TYPES],
    "telltale_bbh": [f"telltale_bbh_{s}" for s in BBH_KINDS],
    "telltale_mmlu_pro": [f"telltale_mmlu_pro_{s}" for s in MMLU_PRO_SUBJECTS],
}

LEAVES: list[str] = [n for n in TOP_LEVEL if n not in GROUPS] + [t for ts in GROUPS.values() for t in ts]

#: default generation budget (max_gen_toks) per task
BUDGET = {n: (32768 if n.startswith("telltale_aime24") else 16384) for n in LEAVES}
