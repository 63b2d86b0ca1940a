"""What fits and how fast, as pure functions (no llama_cpp, numpy or huggingface_hub):

- `estimate`: bytes per device for one configuration, term by term as llama.cpp allocates them;
- `fit`: the configurations of one catalog entry on one machine, and whether each fits;
- `select`: the planner (`make_plan`, `Preferences`, `PlanResult`, `require_fit`);
- `ruled_out`: why a candidate was not chosen (`RuledOut`, one class per `RuledOutKind`, with its figures);
- `speed`: decode and prompt speed prediction, calibrated by measurements;
- `accuracy`: the accuracy matrix of the estimate against llama.cpp's logged buffers.
"""
