"""Dictionaries shipped with lmsmith's data tools (read with `importlib.resources`):

- `finance_terms.txt`: the domain terms whose coverage the quality report measures;
- `finance_synonyms.yaml`: synonym groups for EDA synonym replacement and insertion;
- `metrics.yaml`: financial metrics (table column → Chinese/English names and aliases), the metric
  gazetteer for annotation and the names synthesis writes;
- `ratios.yaml`: the ratios synthesis asks about (numerator, denominator, percent or not).
"""
