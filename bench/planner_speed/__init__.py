"""How long `plan_placement` takes on big mixed pools: `python -m bench planner_speed`."""
