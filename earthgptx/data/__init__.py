"""Training and evaluation data: readers of the annotation layouts in ``../shared/data``
(``readers``), the validation split (``split``), and the instruction builder that turns
annotations into samples of every task level (``instructions``, worded by ``templates``)."""
