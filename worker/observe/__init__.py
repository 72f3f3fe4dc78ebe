"""What the system shows about itself: JSON logs, metrics, progress events, loaded models.

May import worker.jobs, enhancement's results and the root; the rooms above report through it.
"""
