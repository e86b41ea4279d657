"""The tables read back, and the terms the sweep shares with them: proposals, objectives, spaces, values. May import `trainer` only."""
