"""Tables, plots and the leaderboard, built from stored results only (never by running a model)."""
