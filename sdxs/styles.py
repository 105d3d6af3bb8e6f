"""Style presets for the sketch app: prompt templates with a {prompt} slot (our own wording)."""

STYLES: dict[str, str] = {
    "No Style": "{prompt}",
    "Cinematic": "film still of {prompt}, dramatic lighting, shallow depth of field, anamorphic, rich colour grading",
    "3D Model": "3d render of {prompt}, clay material, soft studio lighting, octane, smooth shading",
    "Anime": "anime illustration of {prompt}, clean line art, cel shading, vivid colours, key visual",
    "Digital Art": "digital painting of {prompt}, concept art, painterly brushwork, detailed, artstation",
    "Photographic": "photograph of {prompt}, 50mm lens, natural light, sharp focus, high detail",
    "Pixel art": "pixel art of {prompt}, 16-bit, limited palette, crisp pixels, retro game sprite",
    "Fantasy art": "fantasy artwork of {prompt}, ethereal glow, magical atmosphere, epic, intricate",
    "Neonpunk": "neonpunk {prompt}, glowing neon lights, magenta and cyan, rainy night, cyberpunk city",
    "Manga": "manga panel of {prompt}, black ink, screentone shading, dynamic lines, japanese comic",
}
DEFAULT_STYLE = "No Style"


def apply_style(template: str, prompt: str) -> str:
    """Put the prompt into a template; a template without {prompt} gets the prompt in front."""
    prompt = prompt.strip()
    if "{prompt}" not in template:
        return f"{prompt}, {template}" if prompt else template
    return template.replace("{prompt}", prompt).strip(" ,")
