"""DeepSpeed Inference behind a small OpenAI-compatible API (serving backend "deepspeed").

The model is loaded with transformers and wrapped by ``deepspeed.init_inference``; fused
kernels (``replace_with_kernel_inject``) are used only on CUDA and only when asked for. It
serves GET /health, /version, /v1/models and POST /v1/chat/completions (plain and SSE
streamed), rendering prompts with the tokenizer's own chat template like the other backends.

Requests are served one at a time behind a lock: DeepSpeed Inference has no request
scheduler, and batching concurrent requests of different lengths would mean writing one.
The API key (Bearer) comes from an environment variable, never the command line, and is
checked by the same ASGI guard as transformers serve's, which also answers malformed
bodies with 400.

Run as ``python -m forgelab.serve.ds_inference --model DIR --host H --port P [--dtype ...]``.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
import uuid

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here

from .transformers_guard import KEY_ENV, Guard

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _text(content) -> str:
    """Message content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


class Engine:
    def __init__(self, model: str, dtype: str, kernel_inject: bool, tp_size: int, max_new_tokens: int):
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cuda = torch.cuda.is_available()
        if dtype == "auto":  # fp32 on CPU: bf16 is slow there without AVX-512-BF16/AMX
            dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        torch_dtype = getattr(torch, DTYPES[dtype])
        if kernel_inject and not cuda:
            print("notice: deepspeed.kernel_inject needs CUDA; serving without kernel injection on CPU",
                  flush=True)
        self.tok = AutoTokenizer.from_pretrained(model)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
        self.engine = deepspeed.init_inference(hf, dtype=torch_dtype, tensor_parallel={"tp_size": tp_size},
                                               replace_with_kernel_inject=kernel_inject and cuda)
        self.device = next(self.engine.module.parameters()).device
        self.max_new_tokens = max_new_tokens
        eos = hf.generation_config.eos_token_id or self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.lock = threading.Lock()
        print(f"deepspeed {deepspeed.__version__} inference engine ready: {model} ({dtype}, "
              f"kernel injection {kernel_inject and cuda}, tp {tp_size}, {self.device})", flush=True)

    def _gen_kwargs(self, body: dict) -> dict:
        import torch
        want = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_new_tokens
        kw = {"max_new_tokens": min(int(want), self.max_new_tokens), "pad_token_id": self.tok.pad_token_id}
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])  # OpenAI's default
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p") or 1.0), top_k=0)
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))  # under the lock: the global RNG is ours
        else:
            kw["do_sample"] = False
        if body.get("ignore_eos"):
            kw["min_new_tokens"] = kw["max_new_tokens"]
        return kw

    def run(self, body: dict):
        """Yield the answer's text piece by piece, then a final dict (finish reason, usage).

        Text is decoded from all ids so far, so a character split over tokens comes out whole;
        with stop strings the last len(stop)-1 characters wait until they cannot start one."""
        import torch
        from transformers import StoppingCriteria
        from transformers.generation.streamers import BaseStreamer
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        hold = max((len(s) for s in stops), default=1) - 1
        msgs = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
        ids_q: queue.Queue = queue.Queue()
        cancel, failed = threading.Event(), []

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if self.prompt_seen:  # the first put is the prompt itself
                    ids_q.put(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self):
                ids_q.put(None)

        class Cancel(StoppingCriteria):  # a stop string or a gone client ends generate early
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        with self.lock:
            enc = self.tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt").to(self.device)
            kw = self._gen_kwargs(body)

            def generate():
                try:
                    with torch.inference_mode():
                        self.engine.generate(**enc, **kw, streamer=Streamer(), stopping_criteria=[Cancel()])
                except Exception as e:  # noqa: BLE001 - re-raised in the request's thread
                    failed.append(e)
                    ids_q.put(None)

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            ids, sent, finish = [], 0, "length"
            try:
                while (new := ids_q.get()) is not None:
                    ids += new
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, finish = text[:cut], "stop"
                        cancel.set()
                    elif text.endswith("\ufffd"):
                        continue  # an incomplete UTF-8 character: wait for its next token
                    end = len(text) if cut >= 0 else len(text) - hold
                    if end > sent:
                        yield text[sent:end]
                        sent = end
                    if cut >= 0:
                        break
                else:
                    if failed:
                        raise failed[0]
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    if len(text) > sent:
                        yield text[sent:]
                    if ids and ids[-1] in self.eos:
                        finish = "stop"
            finally:
                cancel.set()
                worker.join()
        n_prompt = int(enc["input_ids"].shape[1])
        yield {"finish_reason": finish, "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids),
                                                  "total_tokens": n_prompt + len(ids)}}


def build_app(engine: Engine, model_name: str, api_key: str):
    import deepspeed
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="forgelab deepspeed inference")
    app.add_middleware(Guard, api_key=api_key)  # Bearer key on /v1/*, 400 for malformed bodies

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/version")
    def version():
        return {"version": deepspeed.__version__}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "deepspeed"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") not in (None, "", model_name):
            return JSONResponse({"error": {"message": f"model {body['model']!r} is not served here; this "
                                           f"server serves {model_name!r}", "type": "not_found_error",
                                           "code": 404}}, status_code=404)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}
        if not body.get("stream"):
            parts = await run_in_threadpool(lambda: list(engine.run(body)))
            final = parts.pop()
            return {**head, "object": "chat.completion", "usage": final["usage"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": final["finish_reason"]}]}

        def chunk(delta: dict, finish=None) -> str:
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        def events():  # iterated in a worker thread by Starlette; closing it cancels generation
            yield chunk({"role": "assistant", "content": ""})
            try:
                for part in engine.run(body):
                    if isinstance(part, str):
                        yield chunk({"content": part})
                        continue
                    yield chunk({}, part["finish_reason"])
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                                     "usage": part["usage"]}) + "\n\n"
            except Exception as e:  # noqa: BLE001 - the client sees an error event, not a cut stream
                yield "data: " + json.dumps({"error": {"message": f"{type(e).__name__}: {e}",
                                                       "type": "server_error", "code": 500}}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model dir (or hub id)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    p.add_argument("--kernel-inject", action="store_true", help="DeepSpeed's fused CUDA kernels")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on max_tokens")
    p.add_argument("--served-model-name", default="", help="the model name requests carry (default: --model)")
    p.add_argument("--api-key-env", default=KEY_ENV, help="environment variable holding the API key")
    a = p.parse_args(argv)
    import uvicorn
    api_key = os.environ.pop(a.api_key_env, "")
    engine = Engine(a.model, a.dtype, a.kernel_inject, a.tensor_parallel_size, a.max_new_tokens)
    uvicorn.run(build_app(engine, a.served_model_name or a.model, api_key), host=a.host, port=a.port)


if __name__ == "__main__":
    main()
