"""Lightning tasks and data for Adapter Zoo (``train.py -> tasks -> zoo``)."""
