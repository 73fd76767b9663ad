"""Checks of issue 3 (policy_checks); filled in by its chapter's author."""
