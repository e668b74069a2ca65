"""General text that no run trains on: what the forgetting gate measures the fine-tune's perplexity on.

Plain prose, instructions, dialogue and code in the register of a pretraining corpus; none of it mentions the
built-in sets' invented places and codes. A fine-tune that damages the base model's language shows up here
as a higher perplexity than the base's.
"""

from __future__ import annotations

GENERAL_TEXTS = (
    "Water evaporates from oceans, lakes and rivers, rises as vapour, cools and condenses into clouds. When the "
    "droplets grow heavy enough they fall as rain or snow, and the water flows back to the sea.",
    "Plants use sunlight, water and carbon dioxide to make sugar in a process called photosynthesis. Oxygen is "
    "released as a by-product, which is why forests and algae matter so much for the air we breathe.",
    "The printing press, developed in Europe in the fifteenth century, made books far cheaper to produce. Ideas "
    "spread faster, literacy rose, and scholars could compare identical copies of the same text.",
    "To make a simple tomato sauce, warm olive oil in a pan, add chopped garlic and cook it gently for a minute. "
    "Pour in the tomatoes, season with salt, and let the sauce simmer for twenty minutes.",
    "def mean(values):\n    if not values:\n        raise ValueError('mean of an empty list')\n"
    "    return sum(values) / len(values)\n",
    "A: Are you coming to the meeting this afternoon?\nB: I think so, but I might be a few minutes late.\n"
    "A: No problem, we will start with the budget and leave the schedule for later.",
    "The heart is a muscle that pumps blood through the body. Arteries carry blood away from the heart, veins "
    "bring it back, and tiny capillaries connect the two inside every organ.",
    "In chess, each player starts with sixteen pieces. The goal is to checkmate the opposing king, which means "
    "attacking it in a way that leaves no legal move to escape.",
    "Interest rates influence how much it costs to borrow money. When rates are low, people and companies tend "
    "to borrow and spend more; when they rise, saving becomes more attractive.",
    "The Moon orbits the Earth about once every twenty-seven days. Its gravity pulls on the oceans and, together "
    "with the Sun, causes the tides that rise and fall along every coast.",
    "Please restart your computer before installing the update. Save any open documents first, then choose "
    "Restart from the menu and wait until the login screen appears again.",
    "Music is often written in measures of equal length. A time signature such as four four tells the player "
    "that each measure holds four beats and that a quarter note gets one beat.",
)
