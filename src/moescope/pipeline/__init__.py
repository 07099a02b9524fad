"""End-to-end jobs built from the parts: analyse a trace to files, compare two, run the demo."""
