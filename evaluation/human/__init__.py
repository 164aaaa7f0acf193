"""Human evaluation: an annotation page (annotate.py), Tideman + normalised Borda (ranking.py,
rank.py), and annotations.jsonl with CSV / Argilla conversions (store.py)."""
