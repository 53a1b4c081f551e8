"""Text data for the language-model demo: an embedded corpus, a character
vocabulary and batching into training windows.

The default corpus, :data:`DEFAULT_TEXT`, is written for this package (so it
ships under the package's licence and needs no download): the log of a
lighthouse keeper, about 11,500 characters of plain English with enough
repetition for a small character-level model to learn words within a minute
of CPU training.

Example:
  >>> from jaxrnn import data
  >>> vocab = data.Vocab.from_text(data.DEFAULT_TEXT)
  >>> ids = vocab.encode("The lamp")
  >>> vocab.decode(ids)
  'The lamp'
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "DEFAULT_TEXT",
    "Vocab",
    "load_text",
    "sample_windows",
    "split_windows",
    "train_val_split",
]

DEFAULT_TEXT = """\
THE KEEPER'S LOG

First day. Wind from the west, light and steady. The boat left me at the
landing at noon and went back to the town before the tide turned. I carried
the stores up the path: oil, bread, salt fish, candles, a sack of apples and
the new glass for the lamp. The tower is white and the door is green. The
stairs go round and round, one hundred and twelve of them, and at the top the
lamp sits in its cage of glass like a bird that sleeps all day.

At dusk I lit the lamp. The light went round and round over the water, and
the water was grey and quiet. I wrote the time in the book and went to bed.

Second day. Wind from the west, stronger. I cleaned the lamp and polished the
glass. The glass must be clean, or the light is weak, and a weak light is no
light at all to a ship in the dark. I mended the window in the store room and
swept the stairs. At dusk I lit the lamp. A ship passed to the north at nine
o'clock, and her bell rang twice. I wrote the time in the book.

Third day. Rain in the morning, sun in the afternoon. The gulls sat on the
rail and watched me work. I cleaned the lamp and polished the glass. I carried
oil up the stairs, four cans, one at a time. In the evening I lit the lamp and
sat by the window. The light went round and the dark came back, the light went
round and the dark came back, and I counted the turns until I fell asleep.

Fourth day. Fog. The fog came in from the sea at dawn and did not lift. On a
day of fog the keeper rings the bell, once every minute, so that a ship that
cannot see the light can hear the rock. I rang the bell all day. My arms are
tired and my ears are ringing, but no ship came near the rock.

Fifth day. Fog in the morning, then wind from the north. The wind tore the fog
into rags and carried it away. I cleaned the lamp and polished the glass. I
found a crack in the third pane from the left and put in the new glass. At
dusk I lit the lamp. Two ships passed to the south, one at eight o'clock and
one at ten. I wrote the times in the book.

Sixth day. Wind from the north, cold. I mended my coat. I counted the stores:
oil for forty nights, bread for ten days, salt fish for twenty, apples for as
long as I can stop myself from eating them. The boat will come again on the
fourteenth day. I cleaned the lamp and polished the glass. At dusk I lit the
lamp.

Seventh day. A quiet day. The sea was flat and blue and the sky was flat and
blue, and between them the tower stood like a white line drawn with a ruler. I
cleaned the lamp and polished the glass. I read the old books in the cupboard.
The keeper before me wrote in the same book in the same way: the wind, the
weather, the ships, the time the lamp was lit. Some nights he wrote only one
line. Lamp lit at six. Lamp lit at six. Lamp lit at six.

Eighth day. Wind from the east. A storm is coming. The gulls left the rail and
flew to the land. The sea turned green and then black. I carried oil up the
stairs, six cans, one at a time, and closed the shutters on the store room. At
dusk I lit the lamp early. The storm came at nine o'clock.

Ninth day. Storm all night and all day. The waves climbed the rock and broke
against the door. The tower shook, but the tower has stood for sixty years and
it will stand for sixty more. I kept the lamp burning all night. I did not
sleep. A ship passed to the north at midnight, low in the water, and her light
went up and down, up and down. She did not come near the rock. I wrote the
time in the book.

Tenth day. The storm went east in the night. In the morning the sea was still
angry but the sky was clean. I walked round the rock. The storm took the
bench, the rain barrel and half of the garden, and it left a plank of wood,
a broken oar and a green bottle with no letter in it. I cleaned the lamp and
polished the glass. The salt from the storm was thick on every pane.

Eleventh day. Wind from the south, warm. I planted the garden again: beans,
onions and a row of peas. I painted the door green where the storm had taken
the paint away. At dusk I lit the lamp. The light went round and round, and
far away on the land another light went round and round, and I thought of the
keeper there, climbing his stairs, cleaning his lamp, writing in his book.

Twelfth day. Wind from the south. I cleaned the lamp and polished the glass.
I mended the bench and set it by the door. In the evening a small boat came
close to the rock, and a boy and his father waved to me. I waved back. They
went home before dark. At dusk I lit the lamp.

Thirteenth day. Rain. I stayed in the tower and wrote letters to my sister.
I told her about the storm, the bottle with no letter in it, the boy in the
boat and the apples, which are nearly gone. I cleaned the lamp and polished
the glass. At dusk I lit the lamp. One ship passed to the north at eleven
o'clock.

Fourteenth day. Wind from the west, light and steady. The boat came at noon
with oil, bread, salt fish, candles and a sack of apples. The boatman asked if
I was lonely. I said no. There is the wind to write down, and the weather, and
the ships, and the lamp to clean and the glass to polish, and every night
there is the light to keep. A keeper who keeps the light is never alone. The
boat went back to the town before the tide turned. At dusk I lit the lamp.

Fifteenth day. Wind from the west. I ate the first apple of the new sack and
cleaned the lamp and polished the glass. The boatman had left a newspaper in
the sack. It was three weeks old, but news is news on a rock, and I read every
word of it, even the prices of cattle and the times of the trains. At dusk I
lit the lamp. Three ships passed to the south before midnight.

Sixteenth day. Calm. The sea was so still that the tower stood upside down in
it, white on blue, and the gulls stood upside down beside it. I painted the
rail and oiled the gears that turn the lamp. The gears must be oiled every
week, or they cry like a cat when the light goes round. I cleaned the lamp and
polished the glass. At dusk I lit the lamp and the gears were quiet.

Seventeenth day. Wind from the north-west, then rain. A seal came up on the
flat rock below the landing and slept there all afternoon. I did not go near
it. At dusk I lit the lamp. The seal was gone in the morning.

Eighteenth day. Fog again. I rang the bell, once every minute, from dawn until
the fog lifted at three o'clock. In the fog I heard a ship's horn far away to
the north, and I rang the bell harder, and the horn answered twice and then
went away to the east. When the fog lifted there was nothing on the sea. I
cleaned the lamp and polished the glass. At dusk I lit the lamp.

Nineteenth day. Wind from the west, light and steady. The beans are up in the
garden, and the onions, but not the peas. I wrote a letter to my sister about
the seal and the ship in the fog. I cleaned the lamp and polished the glass.
At dusk I lit the lamp. Two ships passed to the north, one at nine o'clock
and one at half past ten. I wrote the times in the book.

Twentieth day. Wind from the south-west, warm. I counted the stores: oil for
thirty nights, bread for six days, salt fish for fifteen, candles enough, and
apples for as long as I can stop myself from eating them, which is not long.
I cleaned the lamp and polished the glass. At dusk I lit the lamp.

Twenty-first day. A long day. I washed my shirts and hung them on the rail,
and the wind took one of them and carried it out to sea. It went away like a
white bird, low over the water, and I watched it until it was gone. I have two
shirts now. I cleaned the lamp and polished the glass. At dusk I lit the lamp.

Twenty-second day. Wind from the east, cold. I carried oil up the stairs, five
cans, one at a time. At the top of the stairs I stopped to look at the sea,
as I do every day, and every day it is a different sea. Today it was hard and
bright like a knife. I cleaned the lamp and polished the glass. At dusk I lit
the lamp. No ships.

Twenty-third day. Wind from the east. No ships again. A keeper is glad of an
empty sea, because a ship that is not there cannot be lost, but a keeper is
glad of a ship too, because a ship that passes safely is the reason for the
light. I cleaned the lamp and polished the glass. At dusk I lit the lamp.

Twenty-fourth day. Rain all day. I read the old log of the winter before last.
The keeper then wrote that the ice came down the coast in the second month
and the boat could not come for five weeks, and he lived on salt fish and
tea. I counted my tea. I cleaned the lamp and polished the glass. At dusk I
lit the lamp.

Twenty-fifth day. Wind from the west, light and steady. The peas are up. The
boy and his father came again in their small boat and left a basket on the
landing: eggs, butter and a loaf of bread still warm from the oven. I waved
to them and they waved back. I cleaned the lamp and polished the glass. At
dusk I lit the lamp.

Twenty-sixth day. Wind from the north. I cleaned the lamp and polished the
glass, oiled the gears, swept the stairs and mended the shutter on the west
window. In the evening the sky was red from one side to the other, which means
fine weather tomorrow. At dusk I lit the lamp. A ship passed to the north at
ten o'clock, and her bell rang twice.

Twenty-seventh day. Fine weather, as the sky said. I sat on the bench by the
door in the sun and did nothing for one whole hour. Then I cleaned the lamp
and polished the glass. At dusk I lit the lamp.

Twenty-eighth day. Wind from the west, light and steady. The boat came at noon
with oil, bread, salt fish, candles, a sack of apples and a letter from my
sister. She asked if I was lonely. I wrote back and said no. There is the wind
to write down, and the weather, and the ships, and the lamp to clean and the
glass to polish, and every night there is the light to keep. At dusk I lit
the lamp.

A SONG FOR THE BELL

Ring, bell, ring, when the fog comes in,
when the sea is grey and the light is thin.
Ring for the ship that cannot see,
ring once a minute, and ring for me.

Ring, bell, ring, till the fog is gone,
ring through the night and into the dawn.
Then rest, bell, rest, in the salt and the sun,
till the fog comes back and the work is begun.

A SONG FOR THE LAMP

Turn, light, turn, over the water wide,
over the sleeping sea and the running tide.
Turn for the fishing boat, turn for the ship,
turn for the sailor with salt on his lip.

Burn, light, burn, through the fog and the rain,
burn till the morning comes back again.
Burn for the harbour, burn for the shore,
burn for the keeper who climbs to your door.

Turn, light, turn, and the dark comes round,
turn, light, turn, and the ships are sound.
Burn, light, burn, till the stars grow pale,
and the wind from the west fills the morning sail.

NOTES FOR THE NEXT KEEPER

Clean the lamp every morning. Polish the glass every morning. A clean lamp
and a clean glass make a strong light, and a strong light can be seen from
twenty miles away. Carry the oil up one can at a time; the stairs are steep
and the cans are heavy. Light the lamp at dusk and put it out at dawn. On a
day of fog, ring the bell once every minute. In a storm, keep the lamp burning
all night and do not sleep. Write in the book every day: the wind, the
weather, the ships, the time the lamp was lit. The book is read by the keeper
who comes after you, as I read the book of the keeper who came before me.
Plant the garden in spring and do not plant it too near the rock. Keep the
door painted and the shutters closed. Save one apple for the last day.
"""


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------
def load_text(path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Return :data:`DEFAULT_TEXT`, or the UTF-8 text of the file ``path``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file has fewer than 2 characters (nothing to predict).
    """
    if path is None:
        return DEFAULT_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text: no such file {os.fspath(path)!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 2:
        raise ValueError(f"text: expected at least 2 characters in {os.fspath(path)!r}, got {len(text)}")
    return text


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Vocab:
    """A character vocabulary: token ``i`` is the character ``chars[i]``.

    Args:
      chars: the distinct characters, in token order.

    Example:
      >>> vocab = Vocab.from_text("hello")
      >>> vocab.chars, vocab.size
      ('ehlo', 4)
      >>> vocab.encode("hole").tolist()
      [1, 3, 2, 0]
    """

    chars: str

    def __post_init__(self):
        if not isinstance(self.chars, str) or not self.chars:
            raise ValueError(f"chars: expected a non-empty string, got {self.chars!r}")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("chars: expected distinct characters, got duplicates")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The sorted set of characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError("text: expected a non-empty string")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        """Number of tokens ``V``."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``(len(text),)`` int32 token ids.

        Raises:
          ValueError: ``text`` holds a character outside the vocabulary.
        """
        try:
            return np.fromiter((self._index[c] for c in text), np.int32, len(text))
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of token ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected shape (T,), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids: expected values in [0, {self.size}), got min {ids.min()} and max {ids.max()}")
        return "".join(self.chars[i] for i in ids.tolist())


# --------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------
def train_val_split(ids, val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """Split a 1-D token array into a leading training part and a trailing
    validation part of ``ceil(val_fraction * N)`` tokens."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected shape (N,), got {ids.shape}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    n_val = math.ceil(val_fraction * ids.size)
    return ids[: ids.size - n_val], ids[ids.size - n_val :]


def split_windows(ids, window: int) -> np.ndarray:
    """Cut a 1-D token array into consecutive windows of ``window`` tokens that
    overlap by one, so that every token after the first is predicted exactly
    once by :func:`jaxrnn.lm.loss`. A shorter tail is dropped.

    Args:
      ids: ``(N,)`` token ids.
      window: tokens per window ``L`` (inputs are ``L - 1`` of them).

    Returns:
      ``(W, L)`` int32 windows, ``W = (N - 1) // (L - 1)``.
    """
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1:
        raise ValueError(f"ids: expected shape (N,), got {ids.shape}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window: expected an int >= 2, got {window!r}")
    n = (ids.size - 1) // (window - 1)
    if n == 0:
        raise ValueError(f"ids: expected at least {window} tokens for window={window}, got {ids.size}")
    starts = np.arange(n) * (window - 1)
    return ids[starts[:, None] + np.arange(window)[None, :]]


def sample_windows(key: Array, ids: Array, batch_size: int, window: int) -> Array:
    """``batch_size`` windows of ``window`` consecutive tokens at uniformly
    random offsets (jit-friendly; ``batch_size`` and ``window`` are static).

    Args:
      key: PRNG key.
      ids: ``(N,)`` integer token ids, ``N >= window``.
      batch_size: ``B``.
      window: ``L``.

    Returns:
      ``(B, L)`` windows; ``windows[:, :-1]`` are a language model's inputs and
      ``windows[:, 1:]`` its targets.
    """
    if jnp.ndim(ids) != 1:
        raise ValueError(f"ids: expected shape (N,), got {jnp.shape(ids)}")
    if jnp.shape(ids)[0] < window:
        raise ValueError(f"ids: expected at least window={window} tokens, got {jnp.shape(ids)[0]}")
    starts = jax.random.randint(key, (batch_size,), 0, jnp.shape(ids)[0] - window + 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(ids, s, window))(starts)
