# The README's two entry points: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARCH ?= qwen2
TINY := models/tiny-$(ARCH)
DEMO := outputs/demo
TRAIN_DATA := data/报销细则_distilled_chunked.jsonl
TEST_DATA := data/报销细则_test.jsonl
# The demo runs the normal commands on the offline tiny model and the bundled data.
DEMO_SET := --set model.path=$(TINY) --set model.quantization=none \
	--set data.train_file=$(DEMO)/data/train.jsonl --set data.valid_file=$(DEMO)/data/valid.jsonl \
	--set training.max_seq_length=512 --set output.dir=$(DEMO)/run

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/qwen-mlx tiny-model $(TINY) --data $(TRAIN_DATA) --arch $(ARCH)
	$(BIN)/qwen-mlx data prepare $(TRAIN_DATA) -o $(DEMO)/data --valid-ratio 0.05
	$(BIN)/qwen-mlx data stats $(DEMO)/data/train.jsonl --model $(TINY) --max-seq-length 512
	$(BIN)/qwen-mlx check $(DEMO_SET)
	rm -rf $(DEMO)/run
	# auto: MLX on Apple Silicon, PyTorch elsewhere. A higher learning rate than the seed's:
	# the random tiny model needs it to visibly learn.
	$(BIN)/qwen-mlx train --backend auto $(DEMO_SET) --set training.num_epochs=3 \
		--set training.learning_rate=2e-3 --set training.warmup_steps=5
	# Answers that hold: in-domain, the questions the rules leave open (refusals) and the
	# general drift from the base: all 48 test questions, 20 held-out general prompts.
	$(BIN)/qwen-mlx eval $(DEMO)/run --data $(TEST_DATA) --compare-base --max-tokens 48 \
		--general-prompts 20
	$(BIN)/qwen-mlx export $(DEMO)/run -o $(DEMO)/tiny-$(ARCH)-demo.gguf --quant q8_0
	$(BIN)/qwen-mlx chat --gguf $(DEMO)/tiny-$(ARCH)-demo.gguf --max-tokens 48 \
		--prompt "出差住宿标准是多少？"

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO) $(TINY)
