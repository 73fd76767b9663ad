"""Checks of issue 3 (control_checks); filled in by its chapter's author."""
