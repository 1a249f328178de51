"""Build the unseen-prompt pools (``bentospec/data/pool-tune.jsonl``, ``pool-heldout.jsonl``).

The benchmark's default workload sends every server each prompt at most once in its life
(:mod:`bentospec.bench.prompt_plan`), so it needs hundreds of distinct prompts, more than
anyone writes by hand. These are built from text that ships with Python, so that they are real
prose, reproducible offline and free to redistribute (PSF licence):

- ``rag``: three reference docstrings of one standard-library module (functions, classes and
  their methods; each docstring in one case only) and a question about the first, asked in
  one of several forms, as a developer asks a documentation assistant;
- ``chat``: open questions with nothing to copy from, everyday goals and concepts asked in
  several forms.

Cases alternate between the two files after a seeded shuffle (tune on one, report the other),
and within a file between RAG and chat.
Run ``python -m bentospec.pool_build`` to rebuild them (the docstrings are Python 3.11's).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Iterator
from itertools import product, zip_longest
from pathlib import Path

from bentospec.dataset import HELDOUT_POOL, TUNE_POOL, PromptCase

SEED = 20261207
#: Docstrings shorter than this say too little to copy from; longer ones make prompts past
#: the ~700 tokens of the hand-written RAG cases.
DOC_CHARS = (200, 1500)
DOCS_PER_CASE = 3

#: Standard-library modules the docstrings come from (a string, to keep the list short).
MODULES = (  # noqa: SIM905
    "argparse ast asyncio asyncio.locks asyncio.queues asyncio.streams asyncio.subprocess "
    "base64 bdb bisect builtins bz2 cProfile calendar cmd code codecs codeop collections "
    "collections.abc colorsys compileall concurrent.futures concurrent.futures.thread "
    "configparser contextlib contextvars copy copyreg csv ctypes dataclasses datetime dbm "
    "decimal difflib dis doctest email.headerregistry email.message email.parser email.policy "
    "email.utils enum errno faulthandler fcntl filecmp fileinput fnmatch fractions ftplib "
    "functools getopt gettext glob graphlib grp gzip hashlib heapq hmac html html.parser "
    "http.client http.cookiejar http.cookies http.server imaplib importlib importlib.metadata "
    "importlib.resources inspect io ipaddress itertools json json.decoder json.encoder keyword "
    "linecache locale logging logging.config logging.handlers lzma mailbox math mimetypes mmap "
    "multiprocessing netrc numbers operator optparse os os.path pathlib pdb "
    "pkgutil platform plistlib poplib pprint pstats pty pwd py_compile pydoc queue random re "
    "reprlib resource runpy sched secrets selectors shelve shlex shutil signal site smtplib "
    "socket socketserver sqlite3 ssl stat statistics string struct subprocess symtable "
    "sysconfig tarfile tempfile termios textwrap threading time timeit token tokenize tomllib "
    "trace traceback tracemalloc tty types typing unicodedata unittest unittest.mock "
    "urllib.parse urllib.request uuid venv warnings wave weakref wsgiref.simple_server "
    "xml.dom.minidom xml.etree.ElementTree xml.sax xmlrpc.client zipapp zipfile zipimport zlib "
    "zoneinfo"
).split()

RAG_FORMS = (
    "How do I use `{a}` from Python's `{module}` module? Explain what its arguments mean and "
    "what it returns.",
    "According to the documentation below, what does `{a}` do, and what should I watch out "
    "for when I call it?",
    "I need `{a}` in a script. Summarize how it behaves in a few sentences and list its "
    "parameters.",
    "What is the difference between `{a}` and `{b}`, and when would I pick each one?",
    "Write a short example that calls `{a}`, then explain what each argument in the example does.",
    "Based on these reference pages, which of `{a}`, `{b}` and `{c}` should I read first to "
    "get started, and what does it do?",
)

CHAT_GOALS = (
    "get better sleep on weeknights",
    "save money on groceries",
    "start running as a beginner",
    "learn a new language in my spare time",
    "keep houseplants alive",
    "cook more meals at home",
    "stop procrastinating on big tasks",
    "make friends in a new city",
    "read more books",
    "prepare for a job interview",
    "keep a small garden on a balcony",
    "reduce screen time",
    "organize a messy closet",
    "plan a budget trip with friends",
    "get into birdwatching",
    "keep a journal every day",
    "learn to play the guitar",
    "improve my posture at a desk",
    "drink more water during the day",
    "host a dinner party on a budget",
    "train a puppy to walk on a leash",
    "get better at public speaking",
    "write a short story for the first time",
    "make my morning routine less rushed",
    "declutter my phone and email",
    "start meditating",
    "teach my kids about money",
    "ride a bike to work safely",
    "take better photos with my phone",
    "learn to swim as an adult",
    "prepare for a long hike",
    "keep in touch with old friends",
    "spend less on takeaway coffee",
    "build a habit of stretching",
    "cut down on sugar",
    "study for exams without cramming",
    "set up a home workspace",
    "volunteer in my neighbourhood",
    "pack light for a week away",
    "make a small kitchen easier to cook in",
)
CHAT_GOAL_FORMS = (
    "What are some simple ways to {x}?",
    "I want to {x}. Where should I start?",
    "Can you suggest a four-week plan to {x}?",
    "What mistakes do people often make when they try to {x}?",
)
CHAT_CONCEPTS = (
    "compound interest",
    "the water cycle",
    "how vaccines train the immune system",
    "why the sky is blue",
    "inflation",
    "how a rainbow forms",
    "the difference between weather and climate",
    "how bread rises",
    "photosynthesis",
    "how tides work",
    "what a credit score is",
    "why we dream",
    "how bees make honey",
    "the greenhouse effect",
    "how an election recount works",
    "why leaves change colour in autumn",
    "how a refrigerator keeps food cold",
    "what causes earthquakes",
    "how noise-cancelling headphones work",
    "the placebo effect",
    "how airplanes stay in the air",
    "why cats purr",
    "supply and demand",
    "how the moon's phases happen",
    "what a calorie is",
    "how recycling plastic works",
    "why ice floats",
    "how a compass finds north",
    "what makes music sound sad or happy",
    "how coffee keeps us awake",
    "the northern lights",
    "how a library catalogue is organized",
    "why bridges have expansion joints",
    "how fermentation works",
    "what jet lag does to the body",
    "how solar panels make electricity",
    "why some people are left-handed",
    "how sourdough starters work",
    "what an index fund is",
    "how a thermostat works",
)
CHAT_CONCEPT_FORMS = (
    "Can you explain {x} in simple terms?",
    "Why does {x} matter in everyday life?",
    "What is a common misconception about {x}?",
    "How would you explain {x} to a twelve-year-old?",
)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _documented(module_name: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module's public functions, classes and methods."""
    module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if (
            not (getattr(obj, "__module__", None) or "")
            .lstrip("_")
            .startswith(module_name.split(".")[0])
        ):
            continue  # re-exported from elsewhere
        yield f"{module_name}.{name}", inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (
                    inspect.isroutine(member) or isinstance(member, (classmethod, property))
                ):
                    yield f"{module_name}.{name}.{attr}", inspect.getdoc(member) or ""


def rag_cases() -> list[PromptCase]:
    """One case per :data:`DOCS_PER_CASE` consecutive docstrings of a module, none reused."""
    cases = []
    seen: set[str] = set()  # a docstring re-exported by another module counts once
    for module_name in MODULES:
        docs = []
        for name, doc in _documented(module_name):
            text = _one_line(doc)
            if DOC_CHARS[0] <= len(text) <= DOC_CHARS[1] and text not in seen:
                seen.add(text)
                docs.append((name, text))
        for start in range(0, len(docs) - DOCS_PER_CASE + 1, DOCS_PER_CASE):
            group = docs[start : start + DOCS_PER_CASE]
            names = [name for name, _ in group]
            form = RAG_FORMS[len(cases) % len(RAG_FORMS)]
            cases.append(
                PromptCase(
                    id=f"pool-rag-{len(cases) + 1:03d}",
                    category="rag",
                    query=form.format(module=module_name, a=names[0], b=names[1], c=names[2]),
                    documents=tuple(f"Python reference: {name}. {text}" for name, text in group),
                )
            )
    return cases


def chat_cases() -> list[PromptCase]:
    """Every goal and concept in every form."""
    queries = [
        form.format(x=x)
        for items, forms in ((CHAT_GOALS, CHAT_GOAL_FORMS), (CHAT_CONCEPTS, CHAT_CONCEPT_FORMS))
        for x, form in product(items, forms)
    ]
    return [
        PromptCase(id=f"pool-chat-{i:03d}", category="chat", query=q)
        for i, q in enumerate(queries, 1)
    ]


def split(cases: list[PromptCase], seed: int = SEED) -> tuple[list[PromptCase], list[PromptCase]]:
    """(tune, held-out): alternate cases of a seeded shuffle."""
    shuffled = list(cases)
    random.Random(seed).shuffle(shuffled)
    return shuffled[0::2], shuffled[1::2]


def write(cases: list[PromptCase], path: Path) -> None:
    path.write_text("".join(c.model_dump_json() + "\n" for c in cases), encoding="utf-8")


def interleave(*groups: list[PromptCase]) -> list[PromptCase]:
    """One case of each group in turn: any stretch of a mixed selection is mixed, since the
    benchmark takes the prompts of a level one after the other."""
    return [case for row in zip_longest(*groups) for case in row if case is not None]


def main() -> None:
    (rag_tune, rag_heldout), (chat_tune, chat_heldout) = split(rag_cases()), split(chat_cases())
    tune, heldout = interleave(rag_tune, chat_tune), interleave(rag_heldout, chat_heldout)
    write(tune, TUNE_POOL)
    write(heldout, HELDOUT_POOL)
    print(f"{len(tune)} cases -> {TUNE_POOL}, {len(heldout)} cases -> {HELDOUT_POOL}")


if __name__ == "__main__":
    main()
