"""Published automatic-metric numbers for base and SPO models, to print beside a real run's results.

All on Pick-a-Pic v1 ``validation_unique`` (500 prompts), DDIM 20 steps. Transcribed from
shared/reference/paper.md §1a and §5a:

- SPO self-report: arXiv 2406.04314v3, Table 1 (SDXL) and Table 2 (SD-1.5); CFG 5; images per prompt and
  seeds not stated. SPO's "HPSV2" column is filed under HPSv2.1 here, as LPO does (an inference).
- LPO re-evaluation of the official checkpoints: arXiv 2502.01051v5, Table 2. LPO's script uses seed 42, CFG
  5 for SPO and SDXL but **CFG 7.5 for the SD-1.5 base**, and effectively scores one image per prompt.

The two sources disagree by 0.2-0.4 PickScore for the same SPO checkpoint: compare a run's *paired
difference* with theirs, not only its absolute level.
"""

from __future__ import annotations

# Scorer names as in cfg.eval.scorers.
COLUMNS = ("pickscore", "hpsv21", "imagereward", "aesthetic")

SPO_PAPER = "SPO paper (arXiv 2406.04314v3)"
LPO_PAPER = "LPO re-evaluation (arXiv 2502.01051v5, Table 2)"

PUBLISHED: dict[str, list[dict]] = {
    "sd15": [
        {
            "source": f"{SPO_PAPER}, Table 2",
            "model": "SD-1.5",
            "pickscore": 20.53,
            "hpsv21": 23.79,
            "imagereward": -0.1628,
            "aesthetic": 5.365,
        },
        {
            "source": f"{SPO_PAPER}, Table 2",
            "model": "SPO",
            "pickscore": 21.43,
            "hpsv21": 26.45,
            "imagereward": 0.1712,
            "aesthetic": 5.887,
        },
        {
            "source": LPO_PAPER,
            "model": "SD-1.5 (CFG 7.5)",
            "pickscore": 20.56,
            "hpsv21": 24.05,
            "imagereward": 0.0076,
            "aesthetic": 5.468,
        },
        {
            "source": LPO_PAPER,
            "model": "SPO",
            "pickscore": 21.22,
            "hpsv21": 25.83,
            "imagereward": 0.1678,
            "aesthetic": 5.927,
        },
    ],
    "sdxl": [
        {
            "source": f"{SPO_PAPER}, Table 1",
            "model": "SDXL",
            "pickscore": 21.95,
            "hpsv21": 26.95,
            "imagereward": 0.5380,
            "aesthetic": 5.950,
        },
        {
            "source": f"{SPO_PAPER}, Table 1",
            "model": "SPO",
            "pickscore": 23.06,
            "hpsv21": 31.80,
            "imagereward": 1.0803,
            "aesthetic": 6.364,
        },
        {
            "source": LPO_PAPER,
            "model": "SDXL",
            "pickscore": 21.65,
            "hpsv21": 26.05,
            "imagereward": 0.4780,
            "aesthetic": 5.920,
        },
        {
            "source": LPO_PAPER,
            "model": "SPO",
            "pickscore": 22.70,
            "hpsv21": 31.15,
            "imagereward": 0.9951,
            "aesthetic": 6.343,
        },
    ],
}


def published_for(preset: str) -> list[dict]:
    """Rows for ``preset`` (empty for the tiny world, which is synthetic and has no published numbers)."""
    return PUBLISHED.get(preset, [])
