"""The demo model's world: the procedural moving-shape clips it was trained on (``clips``), a rule-based
judge of prompt adherence (``judge``) and the trained model itself (``model/``).
"""
