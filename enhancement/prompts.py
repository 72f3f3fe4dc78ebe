"""Completion prompts for Qwen 2.5-7B Base, per content (video, image) and quality (fast, high).

A base model has no chat template: it continues a document. The document is a short brief
and worked examples in the target style, ending with the user's idea and an open
`Prompt:` line; the model writes the next example's prompt. Each example is one paragraph,
so the first blank line (or an echoed `Idea:` line) ends the continuation.
"""

from __future__ import annotations

from typing import Literal

Content = Literal["video", "image"]
Quality = Literal["fast", "high"]

#: The label that opens every example's rewrite; the continuation starts after it.
ANSWER_LABEL = "Prompt:"
#: The label of every example's input; an echo of it ends the continuation.
IDEA_LABEL = "Idea:"

_BRIEFS: dict[Content, str] = {
    "video": (
        "Prompts for WAN 2.1, a text-to-video model that makes five-second clips. Each short "
        "idea is rewritten as one paragraph of plain English in present tense. It opens with "
        "the motion: who or what moves, how, and in which direction. It keeps the subject, "
        "its look and the motion consistent from the first frame to the last. It names the "
        "camera work (tracking shot, slow dolly-in, static wide shot, handheld close-up), "
        "then the scene, the light and the mood, and it ends with quality terms. No lists, "
        "no headings, no new characters the idea did not ask for."
    ),
    "image": (
        "Prompts for WAN 2.1 used as a text-to-image model. Each short idea is rewritten as "
        "one paragraph of plain English. It opens with the subject and what it is doing, "
        "then the composition and framing, the lighting, the colour palette and the style "
        "or medium, and it ends with quality terms. No lists, no headings, nothing the idea "
        "did not ask for."
    ),
}

_TARGETS: dict[Quality, str] = {
    "fast": "about 120 words",
    "high": "about 180 words, rich in concrete visual detail",
}

_EXAMPLES: dict[Content, list[tuple[str, str]]] = {
    "video": [
        (
            "a dog catches a frisbee",
            "A golden retriever sprints across a sunlit park lawn from left to right, gathers "
            "its legs and leaps, snapping a bright red frisbee out of the air before landing "
            "in a spray of grass clippings and trotting back toward the camera, tail wagging. "
            "The dog's fur, collar and the frisbee's colour stay the same throughout, and its "
            "gait is smooth and natural. A low tracking shot follows the run at the dog's eye "
            "level, then tilts up with the jump. Late afternoon sun backlights the fur with a "
            "warm rim light; soft shadows stretch across the grass and trees blur in the "
            "background. Cinematic, shallow depth of field, natural motion blur, sharp focus "
            "on the dog, high detail, 4k, smooth 16 fps motion.",
        ),
        (
            "rain in a neon city at night",
            "Heavy rain falls steadily through a narrow street at night while a lone "
            "pedestrian with a black umbrella walks slowly away from the camera, their "
            "reflection rippling in the puddles with every step. The rain, the walker and the "
            "flickering signs keep the same rhythm and look for the whole shot. A slow "
            "dolly-in at shoulder height follows at a distance. Pink and cyan neon signs "
            "glow on wet brick walls, steam rises from a grate, and light streaks across the "
            "soaked asphalt. Moody cyberpunk atmosphere, high contrast, cinematic colour "
            "grading, crisp raindrops, detailed reflections, film grain.",
        ),
    ],
    "image": [
        (
            "an old fisherman",
            "An elderly fisherman with a weathered, deeply lined face and a white beard sits "
            "on an overturned wooden crate, mending a net with calloused hands. Close-up "
            "portrait framed from the chest up, slightly off centre, with the harbour softly "
            "out of focus behind him. Warm golden-hour side light rakes across his face and "
            "picks out every wrinkle and strand of the rope. Muted blues and warm browns. "
            "Documentary photography style, 85mm lens, shallow depth of field, highly "
            "detailed skin texture, sharp focus, professional photograph.",
        ),
        (
            "a castle on a hill",
            "A medieval stone castle with tall round towers and red banners crowns a green "
            "hill above a winding river. Wide landscape composition with the castle on the "
            "upper third and a dirt road leading the eye up from the foreground. Soft morning "
            "light breaks through drifting clouds and lights the towers while the valley "
            "stays in gentle mist. Lush greens, grey stone and a pale blue sky. Epic fantasy "
            "matte painting style, intricate detail, atmospheric perspective, high "
            "resolution, masterpiece.",
        ),
    ],
}


def completion_prompt(idea: str, *, content: Content, quality: Quality) -> str:
    """The document Qwen continues: brief, examples, then the idea and an open answer."""
    brief = f"{_BRIEFS[content]} Length: {_TARGETS[quality]}."
    examples = "\n\n".join(
        f"{IDEA_LABEL} {example_idea}\n{ANSWER_LABEL} {rewrite}"
        for example_idea, rewrite in _EXAMPLES[content]
    )
    return f"{brief}\n\n{examples}\n\n{IDEA_LABEL} {' '.join(idea.split())}\n{ANSWER_LABEL}"
