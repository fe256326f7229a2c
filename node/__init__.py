"""The issc node: runs tasks from a hub on a volunteer's machine."""
