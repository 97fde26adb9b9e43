"""Tiny, randomly initialised keras-hub CausalLM presets built offline for the fine-tuning
tests: GPT-2 (byte-level BPE trained with `tokenizers`), Llama and Gemma (SentencePiece BPE
trained with `sentencepiece`), each saved with `save_to_preset` and its tokenizer."""

import io
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SEQ_LEN = 32


def _sentencepiece(text: str, pad: str, bos: str, eos: str, vocab_size: int = 320) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=pad,
        bos_piece=bos, eos_piece=eos, minloglevel=2, num_threads=1)
    return buf.getvalue()


def build(arch: str, directory: Path, seed: int = 0) -> Path:
    """Writes a tiny `arch` ("gpt2", "llama", "gemma") CausalLM preset to `directory`."""
    import keras
    import keras_hub

    from kmp.gpt.data import load_tokenizer, train_tokenizer

    keras.utils.set_random_seed(seed)
    text = CORPUS.read_text()
    small = dict(num_layers=2, hidden_dim=32, intermediate_dim=64)
    if arch == "gpt2":
        tok = load_tokenizer(train_tokenizer([text], 320, directory.with_name(
            directory.name + "-bpe")))
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=tok.vocabulary_size(), num_heads=2, max_sequence_length=64,
            **small)
        model = keras_hub.models.GPT2CausalLM(
            backbone, keras_hub.models.GPT2CausalLMPreprocessor(tok, sequence_length=SEQ_LEN))
    elif arch == "llama":
        tok = keras_hub.models.LlamaTokenizer(proto=_sentencepiece(text, "<pad>", "<s>",
                                                                   "</s>"))
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=tok.vocabulary_size(), num_query_heads=2, num_key_value_heads=1,
            **small)
        model = keras_hub.models.LlamaCausalLM(
            backbone, keras_hub.models.LlamaCausalLMPreprocessor(tok, sequence_length=SEQ_LEN))
    elif arch == "gemma":
        tok = keras_hub.models.GemmaTokenizer(proto=_sentencepiece(text, "<pad>", "<bos>",
                                                                   "<eos>"))
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=tok.vocabulary_size(), num_query_heads=2, num_key_value_heads=1,
            head_dim=16, **small)
        model = keras_hub.models.GemmaCausalLM(
            backbone, keras_hub.models.GemmaCausalLMPreprocessor(tok, sequence_length=SEQ_LEN))
    else:
        raise ValueError(arch)
    model.save_to_preset(str(directory))
    return directory
