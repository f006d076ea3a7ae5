"""Chat formats of four model families, rebuilt in code on the character tokenizer (nothing can be downloaded):
what each writes around a conversation follows the family's published template, simplified to the parts the
pipeline meets (no tools). Each entry: the tokenizer, and by hand, the special tokens its template writes, the
token that ends an assistant turn, and the pad token a stage should pick."""

from alignment.chat import build_tokenizer, char_tokenizer

CHATML = (  # SmolLM2 / Qwen: a default system prompt when the conversation has none; EOS is <|im_end|>, no pad
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = (  # no system role: the template raises on one
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = (  # [INST] ... [/INST] answer</s>; a system message goes in front of the first user turn
    "{{ bos_token }}{% set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


def families() -> dict[str, tuple]:
    """name -> (tokenizer, formatting tokens, end of turn, pad chosen)"""
    return {
        "llama3": (build_tokenizer(),
                   {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"},
                   "<|eot_id|>", "own"),
        "chatml": (char_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, eos_token="<|im_end|>"),
                   {"<|im_start|>", "<|im_end|>"}, "<|im_end|>", "<|im_end|>"),
        "gemma": (char_tokenizer(["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], GEMMA,
                                 bos_token="<bos>", eos_token="<eos>"),
                  {"<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"}, "<end_of_turn>", "<pad>"),
        "mistral": (char_tokenizer(["<s>", "</s>", "[INST]", "[/INST]"], MISTRAL, bos_token="<s>", eos_token="</s>"),
                    {"<s>", "</s>", "[INST]", "[/INST]"}, "</s>", "</s>"),
    }
