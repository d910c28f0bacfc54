"""Tasks: data sources, prompt formats, token encoding and metrics.

>>> task = load_task("synthetic:facts", split="train", seed=0)
>>> task.format.metrics[0]
'exact_match'
"""

from layercard.tasks.data import (
    Example,
    Task,
    data_roots,
    examples_from_records,
    expand_references,
    load_task,
    read_jsonl,
)
from layercard.tasks.encode import (
    IGNORE_INDEX,
    Encoded,
    batches,
    build_prompt,
    collate,
    count_target_tokens,
    encode_example,
    encode_prompt,
    encode_task,
    turn_end_token,
    turn_end_token_id,
)
from layercard.tasks.metrics import (
    METRICS,
    Metric,
    bleu,
    compute_metrics,
    exact_match,
    extract_final_number,
    gsm8k_accuracy,
    label_accuracy,
    metric_scale,
    normalize_text,
    rouge_l,
    strict_match,
    token_f1,
)
from layercard.tasks.presets import DATASET_PRESETS, PRESETS, TaskFormat, detect_preset, get_preset
from layercard.tasks.synthetic import make_facts, make_format, make_synthetic

__all__ = [
    "DATASET_PRESETS",
    "IGNORE_INDEX",
    "METRICS",
    "PRESETS",
    "Encoded",
    "Example",
    "Metric",
    "Task",
    "TaskFormat",
    "batches",
    "bleu",
    "build_prompt",
    "collate",
    "compute_metrics",
    "count_target_tokens",
    "data_roots",
    "detect_preset",
    "encode_example",
    "encode_prompt",
    "encode_task",
    "exact_match",
    "examples_from_records",
    "expand_references",
    "extract_final_number",
    "get_preset",
    "gsm8k_accuracy",
    "label_accuracy",
    "load_task",
    "make_facts",
    "make_format",
    "make_synthetic",
    "metric_scale",
    "normalize_text",
    "read_jsonl",
    "rouge_l",
    "strict_match",
    "token_f1",
    "turn_end_token",
    "turn_end_token_id",
]
