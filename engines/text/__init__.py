"""Text both engines share: chat templates and prompts, stops, reasoning, tool calls, JSON constraints."""
