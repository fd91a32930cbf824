"""Small in-code word lists and tables the task families draw from (no download)."""

from __future__ import annotations

WORDS = (
    "apple", "river", "garden", "window", "pencil", "market", "silver", "planet", "rocket", "forest",
    "candle", "bridge", "winter", "summer", "butter", "doctor", "castle", "guitar", "jacket", "ladder",
    "mirror", "orange", "pepper", "rabbit", "saddle", "tunnel", "violin", "wallet", "yellow", "zipper",
    "anchor", "basket", "circle", "dragon", "engine", "flower", "hammer", "island", "jungle", "kitten",
    "lemon", "magnet", "needle", "oyster", "parrot", "quartz", "ribbon", "shadow", "ticket", "velvet",
    "cloud", "stone", "light", "music", "paper", "table", "water", "bread", "chair", "horse",
)

POSITIVE = (
    "wonderful", "excellent", "delightful", "great", "fantastic", "lovely", "brilliant", "pleasant",
    "superb", "charming", "amazing", "enjoyable", "marvelous", "good", "happy", "perfect", "beautiful",
    "cheerful", "terrific", "splendid",
)
NEGATIVE = (
    "terrible", "awful", "boring", "dreadful", "horrible", "poor", "disappointing", "bad", "miserable",
    "annoying", "ugly", "dull", "painful", "sad", "nasty", "gloomy", "mediocre", "unpleasant", "weak",
    "broken",
)
SENTIMENT_FRAMES = (
    "The movie was {}.", "What a {} day.", "The service felt {}.", "Her cooking is {}.",
    "This book is {}.", "The concert was {}.", "Our trip was {}.", "The new phone seems {}.",
)

ANIMALS = (
    "lion", "tiger", "zebra", "eagle", "salmon", "rabbit", "horse", "sparrow", "dolphin", "wolf", "frog",
    "camel", "otter", "owl", "shark", "beaver", "giraffe", "lizard", "goat", "penguin",
)
PLANTS = (
    "oak", "fern", "tulip", "cactus", "maple", "rose", "bamboo", "moss", "pine", "daisy", "ivy", "lily",
    "willow", "clover", "orchid", "birch", "sunflower", "lavender", "cedar", "palm",
)
FRUITS = (
    "apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum", "lemon", "kiwi", "melon",
    "apricot", "fig", "lime", "papaya",
)
VEGETABLES = (
    "carrot", "potato", "onion", "spinach", "broccoli", "cabbage", "lettuce", "celery", "radish",
    "turnip", "leek", "kale", "beet", "garlic", "cauliflower",
)
OBJECT_COLORS = (
    ("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"),
    ("tomato", "red"), ("carrot", "orange"), ("lemon", "yellow"), ("strawberry", "red"), ("cucumber", "green"),
    ("milk", "white"), ("crow", "black"), ("ocean", "blue"), ("pumpkin", "orange"), ("cherry", "red"),
    ("lime", "green"), ("ink", "black"), ("cloud", "white"), ("sapphire", "blue"), ("eggplant", "purple"),
    ("grape", "purple"), ("chocolate", "brown"), ("sun", "yellow"), ("flamingo", "pink"),
)
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Russia", "Moscow"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Ireland", "Dublin"), ("Denmark", "Copenhagen"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Colombia", "Bogota"),
)
ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
    ("old", "new"), ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("long", "short"),
    ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"), ("first", "last"), ("inside", "outside"),
    ("push", "pull"), ("win", "lose"), ("buy", "sell"), ("day", "night"), ("above", "below"),
    ("begin", "end"), ("true", "false"), ("asleep", "awake"), ("near", "far"),
)
PLURALS = (
    ("cat", "cats"), ("box", "boxes"), ("baby", "babies"), ("child", "children"), ("mouse", "mice"),
    ("knife", "knives"), ("city", "cities"), ("bus", "buses"), ("tooth", "teeth"), ("foot", "feet"),
    ("dog", "dogs"), ("church", "churches"), ("leaf", "leaves"), ("woman", "women"), ("story", "stories"),
    ("glass", "glasses"), ("book", "books"), ("goose", "geese"), ("wish", "wishes"), ("party", "parties"),
    ("person", "people"), ("wolf", "wolves"), ("tree", "trees"), ("fox", "foxes"),
)
FIRST_NAMES = (
    "Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
    "Maya", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wen", "Yusuf",
)
CITIES = (
    "Lyon", "Osaka", "Denver", "Porto", "Krakow", "Austin", "Seville", "Leeds", "Turin", "Utrecht",
    "Bergen", "Quito", "Dakar", "Perth", "Malmo", "Graz", "Cork", "Bilbao", "Geneva", "Tartu",
)
JOBS = ("teacher", "nurse", "pilot", "baker", "lawyer", "farmer", "chef", "plumber", "artist", "engineer")

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
VOWELS = frozenset("aeiouAEIOU")
