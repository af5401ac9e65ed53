"""Reading a study: cells into lr × steps grids and robustness (`grid`), where it stands (`status`),
the studies list (`listing`), what the live app polls (`views`), one trial and comparisons
(`trials`), and the export of best configurations."""
