"""Training: the recipe (the story top to bottom), the Trainer and its callbacks, the speed meter, distribution
(strategies, CPU workarounds, clean exit), the memory planner, and the export of the run's output folder."""
