"""Small shared helpers: seeding, JSONL metric logs, distributed set-up, wording."""
