"""Checks of issue 3 (optimal_checks); filled in by its chapter's author."""
