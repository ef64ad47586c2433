"""Within-layer importance and weight updates (torch code): Block Influence, Wanda-sp / magnitude structure
scores and OWL outlier ratios, rates -> kept structures, structured OBS and level databases. Strategies that
rank by such scores live in :mod:`evoprune.search`."""
